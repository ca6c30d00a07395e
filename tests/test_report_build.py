"""build_report end to end on synthetic runs written by the real run-log writer."""

import json
import re

import pandas as pd

from bnn_probe.reports import build_report, generate
from bnn_probe.reports.synthetic import make_run, write_run

SMALL = {"n_steps": 60, "n_tracked": 16}


def _study(root):
    write_run(make_run("bop_a", seed=1, config={"pair": "theorem1", "pair_role": "a"}, **SMALL), root / "bop_a")
    write_run(make_run("bop_b", seed=2, trajectory_seed=1, config={"pair": "theorem1", "pair_role": "b"}, **SMALL),
              root / "bop_b")
    write_run(make_run("latent", family="latent", schedule="step", seed=3, status="running", **SMALL),
              root / "latent")
    return root


def test_report_directory_contract(tmp_path):
    root = _study(tmp_path / "study")
    html = build_report([root], tmp_path / "rep", progress=False)
    out = tmp_path / "rep"
    assert html == out / "report.html"
    for f in ("report.html", "report.md", "verdicts.json", "tables/thresholds.csv", "tables/runs.csv"):
        assert (out / f).is_file(), f
    assert len(list((out / "figures").glob("*.png"))) >= 10
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts and all({"claim", "verdict", "statistic", "interval", "n", "runs"} <= set(v) for v in verdicts)
    assert {v["verdict"] for v in verdicts} <= {"supported", "not supported", "inconclusive"}
    assert not any(v["id"].startswith("theorem1") for v in verdicts)  # a power-of-two pair: a code check only
    assert pd.read_csv(out / "tables" / "pairs.csv")["verdict"].tolist() == ["code check (no verdict)"]
    th = pd.read_csv(out / "tables" / "thresholds.csv")
    assert list(th.columns[:5]) == ["layer", "fan_in", "n_weights", "flip_ratio", "recommended_threshold"]
    assert len(th) == 8  # 2 Bop runs x 4 layers
    text = html.read_text()
    # self-contained: every image embedded, nothing fetched from elsewhere
    imgs = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert imgs and all(s.startswith("data:image/png;base64,") for s in imgs)
    assert not re.search(r"(src|href)=['\"](https?:)?//", text)
    assert "did not finish" in text and "latent" in text  # the killed run is reported with a warning
    md = (out / "report.md").read_text()
    assert "## Answers" in md and "## How to read this report" in md and "](figures/" in md and "thresholds = {" in md
    assert md.index("## Answers") < md.index("## How to read this report") < md.index("1. Runs and training")


def test_missing_tables_skip_quietly(tmp_path, recwarn):
    run = make_run("bare", **SMALL)
    run.tracked = pd.DataFrame()
    run.snapshots = pd.DataFrame()
    run.weight_flips = pd.DataFrame()
    run.train = pd.DataFrame()
    res = generate([run], tmp_path / "rep", formats=("md",), progress=False)
    assert not (tmp_path / "rep" / "report.html").exists() and (tmp_path / "rep" / "report.md").exists()
    assert not (tmp_path / "rep" / "figures" / "inertia_flip_probability.png").exists()
    assert not (tmp_path / "rep" / "figures" / "training_curves.png").exists()
    assert (tmp_path / "rep" / "figures" / "fan_in_law.png").exists()
    assert any(v.verdict == "inconclusive" for v in res.verdicts)
    assert not [w for w in recwarn if "figure" in str(w.message)]


def test_inertia_experiment_sections_and_verdict_ids(tmp_path):
    import numpy as np

    from bnn_probe.reports import bop_vs_latent, hazard, theorem1
    from bnn_probe.reports.build import ReportOptions, _Writer
    from bnn_probe.reports.synthetic_inertia import bop_vs_latent_pair, hazard_run, theorem1_group

    def rounding(c, t):
        return np.where(t >= 100, 0.001, 0.0)

    def clip(c, t):
        return np.where(c > 1, 0.01 * np.log10(c), 0.0)

    t1, hz, bl = [], [], []
    for s in (0, 1, 2):
        t1 += theorem1_group(s, "unclipped", rounding) + theorem1_group(s, "clipped", clip)
        hz.append(hazard_run(s))
        bl += bop_vs_latent_pair(s)
    write_run(bl[-1], tmp_path / "written")  # the real writer accepts these runs
    w, opt = _Writer(tmp_path / "parts"), ReportOptions(n_boot=100)
    by = {}
    for mod, runs in ((theorem1, t1), (hazard, hz), (bop_vs_latent, bl)):
        sec, vs = mod.section(runs, w, opt)
        assert sec is not None
        by.update({v.id: v.verdict for v in vs})
        assert mod.section(hz if mod is not hazard else t1, w, opt) == (None, [])  # no such experiment: no part
    assert by == dict.fromkeys(["theorem1.scaled", "theorem1.clipping", "inertia.hazard", "inertia.bop_vs_latent"],
                               "supported")
    for f in ("theorem1_scaled", "hazard", "bop_vs_latent"):
        assert (tmp_path / "parts" / "figures" / f"{f}.png").is_file(), f
    # one line each in build.py: a report of the hazard runs carries the section and its verdict
    res = generate(hz, tmp_path / "rep", formats=("md",), progress=False, options=opt)
    assert [v.verdict for v in res.verdicts if v.id == "inertia.hazard"] == ["supported"]
    assert "cannot tell the inertia view" in (tmp_path / "rep" / "report.md").read_text()
