"""Feedback chains (reports/feedback.py): verdicts on synthetic runs whose spread of flip ratios is known."""

from __future__ import annotations

import pytest

from bnn_probe.reports import feedback, stats
from bnn_probe.reports.build import build_report
from bnn_probe.reports.synthetic import make_run

SMALL = dict(n_steps=30, n_tracked=2)


def _fed(src: str) -> dict:
    return {"threshold_policy": {"name": "from-report", "args": {"path": "r/tables/thresholds.csv", "run": src}}}


def _chains(n_seeds: int, fed_slope: float, rounds: int = 1) -> list:
    """Round 0: |m| ∝ fan_in^-0.5 under one τ (wide layers flip less: spread); rounds ≥ 1: |m| ∝ fan_in^fed_slope
    (0: every layer at the same flip ratio, the spread gone; -0.5: nothing changed)."""
    runs = []
    for s in range(n_seeds):
        runs.append(make_run(f"g_s{s}", seed=s, m_slope=-0.5, config={"seed": s}, **SMALL))
        src = f"g_s{s}"
        for k in range(1, rounds + 1):
            name = f"fed{k}_s{s}"
            runs.append(make_run(name, seed=100 * k + s, m_slope=fed_slope, config={"seed": s, **_fed(src)},
                                 **SMALL))
            src = name
    return runs


def test_equalised_layers_support_the_claim_in_both_rounds():
    ch = feedback.feedback_chains(_chains(3, 0.0, rounds=2))
    assert sorted(ch["round"].unique()) == [0, 1, 2] and len(ch) == 9
    assert (ch.loc[ch["round"] == 0, "cv_ratio"] == 1.0).all()
    vs = feedback.feedback_verdicts(ch)
    assert [v.id for v in vs] == ["thresholds.recommendation", "thresholds.recommendation.round2"]
    assert all(v.verdict == stats.SUPPORTED for v in vs), [v.reason for v in vs]
    assert vs[0].statistic < 0.5 and vs[0].interval[1] < 0.5 and vs[0].n == 3


def test_unchanged_spread_is_not_supported():
    (v,) = feedback.feedback_verdicts(feedback.feedback_chains(_chains(3, -0.5)))
    assert v.verdict == stats.NOT_SUPPORTED and v.interval[0] > 0.5
    assert v.statistic == pytest.approx(1.0, abs=0.3)


def test_two_seeds_are_inconclusive_and_unfed_runs_give_no_section(tmp_path):
    (v,) = feedback.feedback_verdicts(feedback.feedback_chains(_chains(2, 0.0)))
    assert v.verdict == stats.INCONCLUSIVE and "< 3" in v.reason
    assert feedback.feedback_chains([make_run("plain", **SMALL)]).empty
    # a fed run whose source is not among the runs is no chain
    assert feedback.feedback_chains([make_run("orphan", config=_fed("missing"), **SMALL)]).empty


def test_report_has_the_feedback_section_and_verdict_id(tmp_path):
    import json

    build_report(_chains(3, 0.0), tmp_path / "rep", formats=("md",), progress=False)
    ids = [v["id"] for v in json.loads((tmp_path / "rep" / "verdicts.json").read_text())]
    assert "thresholds.recommendation" in ids
    assert (tmp_path / "rep" / "tables" / "threshold_feedback.csv").exists()
    assert "Feeding the recommended thresholds back" in (tmp_path / "rep" / "report.md").read_text()


def test_a_smaller_spread_that_is_not_halved_is_not_supported():
    """The fed runs' spread falls (CV ratio ≈ 0.63 < 1) but not to half: the claim is "at least halves", so the
    verdict is not supported, and a second round that merely keeps it there is not supported either."""
    vs = feedback.feedback_verdicts(feedback.feedback_chains(_chains(3, -0.35, rounds=2)))
    assert [v.verdict for v in vs] == [stats.NOT_SUPPORTED, stats.NOT_SUPPORTED]
    assert 0.5 < vs[0].statistic < 0.8 and vs[0].interval[0] > 0.5
