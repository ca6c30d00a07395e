"""The margin-ladder recommendation (reports/thresholds.py) against hand computations and a synthetic log whose
exceedance curve is known exactly; the tail-matching fallback for logs without the ladder."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from bnn_probe.reports import thresholds
from bnn_probe.reports.synthetic import make_run
from bnn_probe.runlog.schema import MARGIN_LADDER

TAU = 1e-6
K = np.asarray(MARGIN_LADDER)


def _power(a: float = 2.0, c: float = 0.01) -> np.ndarray:
    return c * K ** -a  # R(k·τ) = c·k^−a: log-log linear, so the interpolation is exact


def test_ladder_threshold_power_law_is_exact():
    r = _power()
    tau, bound, e_tau, e_rec = thresholds.ladder_threshold(r, TAU, 0.005)  # c·k^−2 = 0.005 at k = √2
    assert tau == pytest.approx(TAU * math.sqrt(2), rel=1e-12) and bound == ""
    assert e_tau == pytest.approx(-2.0) and e_rec == pytest.approx(-2.0)
    assert thresholds.ladder_threshold(r, TAU, 0.0025)[0] == pytest.approx(2 * TAU)  # on a ladder point
    assert thresholds.ladder_threshold(r, TAU, 0.01 * 8 ** 1)[0] == pytest.approx(TAU / 8 ** 0.5)


def test_ladder_threshold_never_extrapolates():
    r = _power()
    tau, bound, *_ = thresholds.ladder_threshold(r, TAU, 0.9)  # R(τ/8) = 0.64 < 0.9
    assert tau == pytest.approx(TAU / 8) and "ladder end τ/8" in bound
    tau, bound, *_ = thresholds.ladder_threshold(r, TAU, 1e-5)  # R(8τ) = 1.6e-4 > 1e-5
    assert tau == pytest.approx(8 * TAU) and "ladder end 8τ" in bound


def test_ladder_threshold_zero_rung_and_no_data():
    r = np.array([0.4, 0.2, 0.1, 0.05, 0.0, 0.0, 0.0])
    tau, bound, e_tau, e_rec = thresholds.ladder_threshold(r, TAU, 0.025)  # linear in R between 0.05 and 0
    assert tau == pytest.approx(TAU * 2 ** 0.5) and bound == "" and math.isnan(e_rec) and math.isnan(e_tau)
    assert math.isnan(thresholds.ladder_threshold(r, TAU, 0.0)[0])
    assert math.isnan(thresholds.ladder_threshold(np.full(7, np.nan), TAU, 0.1)[0])
    assert math.isnan(thresholds.ladder_threshold(r, 0.0, 0.1)[0])


def test_recommendation_reads_the_known_exceedance_curve():
    """Synthetic log: the rate at τ' is flip_base·P(|m| > τ'), |m| log-normal (median med_l, log-sd 1), so the τ
    giving the target is med_l·exp(Φ⁻¹(1 − target/flip_base)); the ladder recovers it within the interpolation
    error of a log-normal tail between rungs a factor 2 apart."""
    run = make_run("a", seed=1, noise=0.0, n_steps=40, n_tracked=2, threshold=TAU, flip_base=0.05)
    lt = thresholds.layer_table([run])
    assert {"margin_rate_1_8", "margin_rate_8"} <= set(lt.columns)
    rec = thresholds.recommended_thresholds(lt)
    t = rec.table.set_index("layer")
    assert set(t["method"]) == {"margin ladder"}
    target = rec.target["a"]
    med = 2 * TAU * (t["fan_in"].astype(float) / 64.0) ** -0.5
    exact = med * np.exp(norm.isf(target / 0.05))
    np.testing.assert_allclose(t["recommended_threshold"], exact, rtol=0.05)
    assert (t["elasticity"] < 0).all()
    assert (t["recommended_threshold"] < TAU).sum() >= 1 and (t["recommended_threshold"] > TAU).sum() >= 1


def test_old_logs_fall_back_to_tail_matching_and_say_so():
    run = make_run("old", seed=1, noise=0.0, n_steps=40, n_tracked=2, margin_ladder=False)
    rec = thresholds.recommended_thresholds(thresholds.layer_table([run]))
    assert set(rec.table["method"]) == {"tail matching (no margin ladder in the log)"}
    assert rec.method.startswith("Tail matching") and rec.table["elasticity"].isna().all()
    assert np.isfinite(rec.table["recommended_threshold"]).all()


def test_snippet_uses_the_runs_gamma():
    run = make_run("g", seed=1, n_steps=20, n_tracked=2, gamma=3e-4)
    rec = thresholds.recommended_thresholds(thresholds.layer_table([run]))
    assert "gamma=0.0003)" in rec.snippet and "1e-3" not in rec.snippet
    rec2 = thresholds.recommended_thresholds(thresholds.layer_table([run]), gamma={})
    assert "gamma=YOUR_GAMMA" in rec2.snippet


def test_a_version_1_log_stays_readable_and_reports_by_tail_matching(tmp_path):
    """A schema-1 log (flip_now/settled columns, no margin ladder) loads, and its report's thresholds.csv keeps its
    leading columns, recommends by the documented fallback and stays readable by the from-report policy."""
    import pandas as pd

    import bnn_probe
    from bnn_probe.optim.thresholds import read_thresholds_csv
    from bnn_probe.reports.build import build_report
    from bnn_probe.reports.synthetic import write_run

    run = make_run("v1", seed=1, n_steps=30, n_tracked=2, margin_ladder=False)
    run.steps["flip_now"] = run.steps["flips"].astype(float)
    run.steps["settled"] = 0.0
    assert run.meta["schema_version"] == 1
    write_run(run, tmp_path / "v1")
    got = bnn_probe.load_run(tmp_path / "v1")
    assert got.steps["margin_exceed_1"].isna().all() and (got.steps["flip_now"] == got.steps["flips"]).all()
    assert got.tracked["step_size"].isna().all() and got.steps["c2i_corr"].isna().all()
    build_report([got], tmp_path / "rep", formats=("md",), progress=False)
    csv = pd.read_csv(tmp_path / "rep" / "tables" / "thresholds.csv")
    assert list(csv.columns[:5]) == ["layer", "fan_in", "n_weights", "flip_ratio", "recommended_threshold"]
    assert set(csv["method"]) == {"tail matching (no margin ladder in the log)"}
    assert set(read_thresholds_csv(tmp_path / "rep" / "tables" / "thresholds.csv")) == set(csv["layer"])


def test_tail_matching_can_be_forced_for_comparison():
    run = make_run("f", seed=1, noise=0.0, n_steps=40, n_tracked=2)
    lt = thresholds.layer_table([run])
    rec = thresholds.recommended_thresholds(lt, method="tail")
    assert set(rec.table["method"]) == {"tail matching"} and rec.method.startswith("Tail matching")
    with pytest.raises(ValueError, match="method"):
        thresholds.recommended_thresholds(lt, method="auto")


def test_report_cli_threshold_method_tail(tmp_path):
    from click.testing import CliRunner

    from bnn_probe.cli import cli
    from bnn_probe.reports.synthetic import write_run

    write_run(make_run("c", seed=1, n_steps=20, n_tracked=2), tmp_path / "c")
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "c"), "--out", str(tmp_path / "rep"), "--format", "md",
                                    "--quiet", "--threshold-method", "tail"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    assert set(pd.read_csv(tmp_path / "rep" / "tables" / "thresholds.csv")["method"]) == {"tail matching"}
    bad = CliRunner().invoke(cli, ["report", str(tmp_path / "c"), "--out", str(tmp_path / "r2"),
                                    "--threshold-method", "nope"])
    assert bad.exit_code == 2
