"""Report layout: answers first (verdicts by id), plain words, disagreements, run labels, config differences,
collapsed per-run detail, figures that draw every run."""

import math

import pandas as pd
import pytest
from PIL import Image

from bnn_probe.reports import figures as F
from bnn_probe.reports import generate
from bnn_probe.reports.answers import build_answers, disagreements, plain, question_of
from bnn_probe.reports.layout import compact_mapping, config_differences, group_notes, runs_view
from bnn_probe.reports.render import fmt
from bnn_probe.reports.stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict
from bnn_probe.reports.synthetic import make_run
from bnn_probe.reports.training import (
    HELD_OUT_ACCURACY,
    accuracy_metric,
    analyse_training,
    optimizer_label,
    runs_table,
    threshold_label,
)

SMALL = {"n_steps": 40, "n_tracked": 8}


def _v(vid: str, verdict: str = SUPPORTED, claim: str = "a claim") -> Verdict:
    return Verdict(claim, verdict, 0.1, (0.0, 0.2), 5, ["r"], "stat", "method", "reason", "", vid)


def test_verdicts_go_to_their_question_by_id_prefix_and_unknown_ids_still_show(tmp_path):
    vs = [_v("inertia.magnitude_reset"), _v("theorem1.scaled"), _v("tau0.equivalence"), _v("thresholds.policies"),
          _v("schedules.flip_ratio"), _v("")]
    assert [question_of(v) for v in vs] == ["inertia", "inertia", "inertia", "thresholds", "", ""]
    fig = tmp_path / "width_sweep.png"
    fig.write_bytes(b"png")
    answers = build_answers(vs, lambda name: fig if name == "width_sweep.png" else None)
    assert [a.title[:2] for a in answers] == ["Q1", "Q2", "Ot"]
    assert [len(a.verdicts) for a in answers] == [3, 1, 2]  # nothing dropped
    assert answers[0].figure is None  # no figure drawn for Q1's verdicts
    assert answers[1].figure is None  # width_sweep.png belongs to thresholds.fan_in_controlled, absent here
    answers = build_answers([_v("thresholds.fan_in_controlled")], lambda name: fig if name == "width_sweep.png"
                            else None)
    assert answers[1].figure == fig and "width_sweep.png" in answers[1].figure_caption
    assert answers[0].sentences == ["No run in this report tests this question."]
    figs = {n: tmp_path / n for n in ("magnitude_reset.png", "hazard.png")}
    answers = build_answers([_v("inertia.magnitude_reset", INCONCLUSIVE), _v("inertia.hazard", SUPPORTED)], figs.get)
    assert answers[0].figure == figs["hazard.png"]  # the figure of a decided verdict before an undecided one's
    answers = build_answers([_v("thresholds.fan_in_pooled"), _v("thresholds.new"), _v("thresholds.fan_in_controlled")],
                            figs.get)
    assert [v.id for v in answers[1].verdicts] == ["thresholds.fan_in_controlled", "thresholds.fan_in_pooled",
                                                   "thresholds.new"]  # the controlled result first


def test_plain_words_follow_the_outcome_and_fall_back_on_the_claim():
    assert "transient" in plain(_v("inertia.magnitude_reset", SUPPORTED))
    assert "lasting damage" in plain(_v("inertia.magnitude_reset", NOT_SUPPORTED))
    assert "smaller |m|" in plain(_v("thresholds.fan_in_controlled_prediction", SUPPORTED))  # id with a suffix
    assert plain(_v("new.claim", SUPPORTED, "X beats Y")) == "X beats Y: holds."
    assert plain(_v("new.claim", NOT_SUPPORTED, "X beats Y")) == "X beats Y: does not hold."
    assert plain(_v("inertia.magnitude_reset", INCONCLUSIVE, "X beats Y")).startswith("Undecided: X beats Y")


def test_disagreeing_verdicts_get_a_sentence_and_agreeing_ones_do_not():
    ctrl, pooled = _v("thresholds.fan_in_controlled", SUPPORTED), _v("thresholds.fan_in_pooled", NOT_SUPPORTED)
    notes = disagreements([ctrl, pooled])
    assert len(notes) == 1 and "controlled result is the one to trust" in notes[0]
    assert disagreements([ctrl, _v("thresholds.fan_in_pooled", SUPPORTED)]) == []
    assert disagreements([ctrl, _v("thresholds.fan_in_pooled", INCONCLUSIVE)]) == []
    same = disagreements([_v("tau0.equivalence", SUPPORTED), _v("tau0.equivalence", NOT_SUPPORTED)])
    assert len(same) == 1 and "differ between groups" in same[0]


def test_runs_table_names_the_optimizer_and_a_per_layer_threshold_range():
    bop = make_run("bop", **SMALL)
    bop.meta["optimizer"]["class"] = "CaseOptimizer"
    del bop.meta["config"]["optimizer"]
    bop.meta["optimizer"]["groups"] = [{"optimizer": "Bop", "threshold": 1e-6}, {"optimizer": "Adam", "lr": 1e-2}]
    latent = make_run("adam", family="latent", seed=2, **SMALL)
    del latent.meta["config"]["optimizer"]
    latent.meta["optimizer"] = {"class": "CaseOptimizer", "groups": [{"optimizer": "Adam"}]}
    sgd = make_run("sgd", family="latent", seed=3, **SMALL)
    sgd.meta["config"]["optimizer"] = "latent-sgd"
    assert [optimizer_label(r) for r in (bop, latent, sgd)] == ["bop", "latent-adam", "latent-sgd"]
    per_layer = bop.steps.assign(threshold=bop.steps["layer"].map({"fc1.weight": 4e-6, "fc2.weight": 2e-6,
                                                                    "fc3.weight": 1e-6, "fc4.weight": 5e-7}))
    assert threshold_label(bop, per_layer, math.nan) == "5e-07–4e-06"
    assert threshold_label(bop, bop.steps, math.nan) == 1e-6
    table, _ = runs_table([bop, latent, sgd])
    assert list(table["optimizer"]) == ["bop", "latent-adam", "latent-sgd"]
    assert math.isnan(table["threshold"].iloc[1])  # a latent run has no τ, whatever its config's default
    assert "CaseOptimizer" not in runs_view(table).to_string()


@pytest.mark.parametrize("name", ["accuracy", "test_accuracy", "val_acc"])
def test_accuracy_is_found_under_any_documented_name(name):
    run = make_run("r", **SMALL)
    run.train = pd.DataFrame({"step": [10, 20], name: [0.5, 0.75]})
    assert name in HELD_OUT_ACCURACY and accuracy_metric(run.train) == name
    table, _ = runs_table([run])
    assert table["final_val_accuracy"].iloc[0] == 0.75 and table["accuracy_metric"].iloc[0] == name
    run.train = pd.DataFrame({"step": [10], "loss": [1.0]})
    assert math.isnan(runs_table([run])[0]["final_val_accuracy"].iloc[0])


def test_config_differences_per_group_and_shared_options():
    runs = [make_run(f"a{i}", seed=i, tag="grid", config={"gamma": g}, **SMALL) for i, g in enumerate((1e-3, 1e-2))]
    runs.append(make_run("b", seed=5, tag="other", config={"gamma": 1e-3, "clip": True}, **SMALL))
    for r, c in zip(runs, (3, 10, 10), strict=True):  # what the study set in extra tells runs apart too
        r.meta["config"]["extra"] = {"theorem1": {"C": c}, "threshold_policy": {"thresholds": {"fc1": r.name}}}
    groups, shared = config_differences(runs)
    assert [g for g, _, _ in groups] == ["grid", "other"]
    grid = groups[0][1]
    assert list(grid["run"]) == ["a0", "a1"] and "gamma" in grid.columns and "clip" not in grid.columns
    assert list(grid["theorem1.C"]) == [3, 10]
    assert not any("threshold_policy" in c for c in grid.columns)  # recorded by training, per run: in meta.json
    assert groups[1][2].get("clip") is True  # what sets the group apart from the other runs
    assert shared.get("dataset") == "digits" and "gamma" not in shared
    assert compact_mapping({"a": 10, "b": 10}) == "10 (all 2 runs)"
    assert compact_mapping({"a": 10, "b": 20}) == "a: 10; b: 20"


def test_fmt_gives_sensible_digits():
    assert [fmt(x) for x in (1e-6, 0.0012345, 123456.0, 174.0, 0.5, float("nan"), None)] == \
        ["1e-06", "0.00123", "123456", "174", "0.5", "—", "—"]


def test_every_run_is_a_panel_and_a_metric_logged_once_is_a_marker(tmp_path):
    import matplotlib.pyplot as plt

    runs = [make_run(f"r{i}", seed=i, tag="g1" if i < 5 else "g2", **SMALL) for i in range(9)]
    runs[0].train = pd.DataFrame({"step": [40], "accuracy": [0.9]})  # logged once
    tr = analyse_training(runs)
    assert tr.layer_flips["run"].nunique() == 9
    h9 = Image.open(F.layer_flip_ratio(tr.layer_flips, tmp_path / "l9.png")).size[1]
    h4 = Image.open(F.layer_flip_ratio(tr.layer_flips[tr.layer_flips["run"].isin(["r0", "r1", "r2", "r3"])],
                                       tmp_path / "l4.png")).size[1]
    assert h9 > 2.5 * h4  # 9 runs: three rows of panels (none dropped); 4 runs: one row
    assert F.training_curves(tr.curves, tmp_path / "curves.png").exists()
    fig, ax = plt.subplots()
    F._draw_runs(ax, tr.curves[(tr.curves["metric"] == "accuracy")], "value", "g1")
    (line,) = ax.get_lines()
    assert line.get_marker() == "o" and len(line.get_xdata()) == 1  # one logged value: one visible point
    plt.close(fig)


def test_report_has_answers_first_and_per_run_detail_collapsed(tmp_path):
    runs = [make_run("bop", seed=1, tag="grid", **SMALL), make_run("lat", family="latent", seed=2, tag="grid",
                                                                    **SMALL)]
    runs[0].path = str(tmp_path / "runs" / "bop")
    generate(runs, tmp_path / "rep", progress=False)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.index("id='answers'") < html.index("How to read this report") < html.index("id='runs'")
    assert html.index("id='thresholds'") < html.index("id='appendix'")
    assert "<details class='block'><summary>bop</summary>" in html and "meta.json (main keys)" in html
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "../runs/bop/meta.json" in md and '"optimizer": {' not in md  # linked, not pasted
    assert "Q1." in md and "Q2." in md and "unit of replication is the run" in md


def test_notes_about_many_runs_become_one_line():
    notes = ["a: no tracked weights; skipped", "b: no tracked weights; skipped", "c: other", "a general note"]
    assert group_notes(notes, ["a", "b", "c"]) == ["no tracked weights; skipped (2 runs): a, b", "c: other",
                                                    "a general note"]


def test_layer_lines_join_the_points_of_a_quantile_cadence():
    """A quantile column logged every 10th step (NaN between) is drawn as one line through its points, not as
    isolated NaN-broken pieces (matplotlib draws nothing between NaNs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, 101))
    df = pd.DataFrame({"step": steps * 2, "layer": ["a"] * 100 + ["b"] * 100, "fan_in": [8] * 100 + [64] * 100,
                       "abs_m_q50": [float(s) if s % 10 == 0 else math.nan for s in steps] * 2})
    fig, ax = plt.subplots()
    F._layer_lines(ax, df, "abs_m_q50")
    xs = [line.get_xdata() for line in ax.get_lines()]
    plt.close(fig)
    assert [list(x) for x in xs] == [list(range(10, 101, 10))] * 2
