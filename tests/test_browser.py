"""The HTML report in a real browser (headless Chromium): it renders, every embedded figure decodes, and a report
of the main job's size (24 runs in six study groups, like ``bnn-probe study all --quick``) stays readable: at most
25,000 px tall at 1400 px wide and no element wider than the window — measured in Chromium, not guessed."""

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
    n_expected = len(list((tmp_path / "rep" / "figures").glob("*.png"))) + html.read_text().count("class='answer-fig'")
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


# measures the laid-out page once it has loaded: its height, then, with every <details> opened, the elements wider
# than the window; and the decoded images
MEASURE = """<script>
window.addEventListener('load', () => {
  const vw = document.documentElement.clientWidth;
  document.body.dataset.height = String(document.documentElement.scrollHeight);
  document.querySelectorAll('details').forEach(d => { d.open = true; });  // collapsed tables must fit too
  const wide = [];
  for (const e of document.querySelectorAll('body *')) {
    const r = e.getBoundingClientRect();
    if (r.width > 0 && (r.right > vw + 1 || r.left < -1)) wide.push(e.tagName + ':' + Math.round(r.right));
  }
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.scrollWidth = String(document.documentElement.scrollWidth);
  document.body.dataset.viewport = String(vw);
  document.body.dataset.wide = String(wide.length) + ' ' + wide.slice(0, 5).join(' ');
  document.body.dataset.images = imgs.length + '/' + ok;
});
</script>"""

# six study groups like the main job's: (tag, run names, family, steps, layers)
_L3 = (("fc1.weight", 64, 16384), ("fc2.weight", 256, 65536), ("fc3.weight", 256, 2560))
_L4 = (("fc1.weight", 64, 131072), ("fc2.weight", 2048, 131072), ("fc3.weight", 64, 65536),
       ("fc4.weight", 1024, 10240))
GROUPS = (("hyperparams", [f"bop-g{g}-t{t}" for g, t in (("1e-2", "1e-6"), ("1e-3", "0"), ("1e-3", "1e-5"),
                                                           ("1e-3", "1e-6"), ("1e-4", "1e-6"))], "bop", 170, _L3),
          ("inertia", ["bop", "latent-adam-clip", "latent-sgd"], None, 170, _L3),
          ("theorem1", ["theorem1-a", "theorem1-b"], "latent", 170, _L3),
          ("tau0", ["tau0-bop", "tau0-latent-sgd"], None, 170, _L3),
          ("thresholds", ["global-t2e-7", "global-t1e-6", "global-t5e-6", "fan-in", "calibrated", "bop2nd",
                          "latent-adam", "no-bn"], None, 90, _L4),
          ("thresholds-sweep", [f"sweep-w{w}" for w in (32, 64, 128, 256)], "bop", 90, _L3))


def _main_job_sized_runs():
    runs, seed = [], 0
    for tag, names, fam, n_steps, layers in GROUPS:
        for name in names:
            seed += 1
            f = fam or ("latent" if "latent" in name else "bop2nd" if name == "bop2nd" else "bop")
            cfg = {"pair": f"{tag}-s0", "pair_role": "a" if seed % 2 else "b"} if tag in ("theorem1", "tau0") else {}
            runs.append(make_run(f"{tag}-{name}-s0", family=f, layers=layers, n_steps=n_steps, n_tracked=16,
                                 seed=seed, tag=tag, config={"seed": 0, **cfg}))
    return runs


def test_main_job_sized_report_fits_the_page_in_chromium(tmp_path):
    runs = _main_job_sized_runs()
    assert len(runs) == 24
    html = build_report(runs, tmp_path / "rep", formats=("html",), progress=False)
    page = tmp_path / "measure.html"
    page.write_text(html.read_text().replace("</body>", MEASURE + "</body>"))
    r = _chromium(["--window-size=1400,1000", "--virtual-time-budget=15000", "--dump-dom", page.as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    tag = re.search(r"<body[^>]*>", r.stdout).group(0)
    got = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', tag))
    assert got["viewport"] == "1400", tag
    n_png = len(list((tmp_path / "rep" / "figures").glob("*.png")))
    n_img, n_ok = map(int, got["images"].split("/"))
    assert n_img >= 12 and n_ok == n_img, got  # every embedded figure decoded
    assert int(got["height"]) <= 25_000, got  # the 24 fully expanded meta.json dumps made it 157,749 px
    assert got["wide"].split()[0] == "0" and int(got["scroll-width"]) <= 1400, got  # nothing wider than the window
    assert n_img == n_png + html.read_text().count("class='answer-fig'")  # the answers repeat a section's figure
