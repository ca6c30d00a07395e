"""The HTML report in a real browser (headless Chromium): it renders, and every embedded figure loads."""

import re
import shutil
import subprocess

import pytest

from bnn_probe.reports import build_report
from bnn_probe.reports.synthetic import make_run

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"),
                             shutil.which("google-chrome")) if p and shutil.os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]

# marks the body once the page has loaded: how many images there are and how many decoded with a size
CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.images = String(imgs.length);
  document.body.dataset.imagesOk = String(ok);
  document.body.dataset.imagesLoaded = String(imgs.length > 0 && ok === imgs.length);
});
</script>"""


def _chromium(args, tmp_path):
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium_with_all_figures(tmp_path):
    runs = [make_run("bop", seed=1, n_steps=50, n_tracked=16),
            make_run("latent", family="latent", seed=2, n_steps=50, n_tracked=16)]
    html = build_report(runs, tmp_path / "rep", formats=("html",), progress=False)
    n_expected = len(list((tmp_path / "rep" / "figures").glob("*.png")))
    assert n_expected >= 8
    page = tmp_path / "check.html"
    page.write_text(html.read_text().replace("</body>", CHECK + "</body>"))

    shot = tmp_path / "shot.png"
    r = _chromium([f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()], tmp_path)
    assert shot.exists() and shot.stat().st_size > 20_000, r.stderr[-2000:]

    r = _chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    body = re.search(r"<body[^>]*>", r.stdout)
    assert body, r.stdout[:500]
    tag = body.group(0)
    assert 'data-images-loaded="true"' in tag, tag
    assert f'data-images="{n_expected}"' in tag and f'data-images-ok="{n_expected}"' in tag
