"""Theorem 1 with non-power-of-two C, the flip hazard, Bop vs latent, and the run pools: every verdict rule is shown
to fail on data where its claim is false and to pass where it holds (synthetic logs with known answers)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bnn_probe.reports import bop_vs_latent, hazard, pools, stats, theorem1
from bnn_probe.reports.synthetic_inertia import bop_vs_latent_pair, hazard_run, real_valued_sgd_run, theorem1_group


# ---------------------------------------------------------------------------------------------------- Theorem 1
def _rounding_like(c, t):
    """Every run (rounding control included) diverges alike from step 100: rounding-driven divergence."""
    return np.where(t >= 100, 0.002 * (t - 99) / 100, 0.0)


def _clip_breaks(c, t):
    """Divergence from step 1, growing with C."""
    return np.where(c > 1, 0.01 * np.log10(c) * t / 200, 0.0)


def _summary(fn_unclipped, fn_clipped, seeds=(0, 1, 2)):
    runs = []
    for s in seeds:
        runs += theorem1_group(s, "unclipped", fn_unclipped) + theorem1_group(s, "clipped", fn_clipped)
    traj, summary, notes = theorem1.trajectories(runs)
    assert not notes
    return traj, summary


def test_theorem1_hamming_and_first_difference_are_measured_exactly():
    traj, summary = _summary(_rounding_like, _clip_breaks, seeds=(0,))
    row = summary[(summary["arm"] == "clipped") & (summary["C"] == 100.0)].iloc[0]
    assert row["first_difference_step"] == 1
    # fraction at the last snapshot (t = 200): 0.01·log10(100)·200/200 = 0.02 of each layer, floored per layer
    assert row["final_fraction"] == pytest.approx((int(0.02 * 4096) + int(0.02 * 16384)) / (4096 + 16384))
    ctrl = summary[(summary["arm"] == "unclipped") & (summary["role"] == "rounding")].iloc[0]
    assert ctrl["first_difference_step"] == 100


def test_theorem1_verdicts_supported_when_scaling_only_rounds_and_clipping_breaks_it():
    _, summary = _summary(_rounding_like, _clip_breaks)
    assert theorem1.scaled_verdict(summary).verdict == stats.SUPPORTED
    v = theorem1.clipping_verdict(summary)
    assert (v.verdict, v.id) == (stats.SUPPORTED, "theorem1.clipping")
    tab = theorem1.by_c(summary)
    clipped = tab[(tab["arm"] == "clipped") & (tab["role"] == "scaled")].sort_values("C")
    assert clipped["mean_fraction"].is_monotonic_increasing  # faster divergence for larger C


def test_theorem1_scaled_not_supported_when_scaling_diverges_beyond_rounding():
    # without clipping, yet the scaled runs diverge from step 1 (as if the gradient depended on |w̃|)
    _, summary = _summary(_clip_breaks, _clip_breaks)
    v = theorem1.scaled_verdict(summary)
    assert (v.verdict, v.id) == (stats.NOT_SUPPORTED, "theorem1.scaled")


def test_theorem1_scaled_supported_when_scaled_runs_diverge_less_than_the_rounding_control():
    def less(c, t):
        return np.where(t >= 50, 0.05 if c == 1.0 else 0.001, 0.0)  # c == 1: the rounding control

    _, summary = _summary(less, _clip_breaks)
    assert theorem1.scaled_verdict(summary).verdict == stats.SUPPORTED


def test_theorem1_scaled_not_supported_when_one_c_alone_diverges():
    def one(c, t):  # only C = 100 diverges beyond rounding
        return np.where(c == 100.0, 0.05 * t / 200, _rounding_like(c, t))

    _, summary = _summary(one, _clip_breaks)
    v = theorem1.scaled_verdict(summary)
    assert v.verdict == stats.NOT_SUPPORTED and "C = 100" in v.reason and "worst C = 100" in v.statistic_name


def test_theorem1_clipping_not_supported_when_clipping_changes_nothing():
    _, summary = _summary(_rounding_like, _rounding_like)
    assert theorem1.clipping_verdict(summary).verdict == stats.NOT_SUPPORTED


def test_theorem1_fewer_than_three_seeds_is_inconclusive():
    _, summary = _summary(_rounding_like, _clip_breaks, seeds=(0, 1))
    assert theorem1.scaled_verdict(summary).verdict == stats.INCONCLUSIVE
    assert theorem1.clipping_verdict(summary).verdict == stats.INCONCLUSIVE


# ---------------------------------------------------------------------------------------------------- hazard
def test_person_periods_keep_unflipped_rows_up_to_the_end_and_censor_the_last_sample():
    tr = pd.DataFrame({"step": [1, 2, 3, 4, 1, 2, 3, 4], "layer": "a", "index": [0] * 4 + [1] * 4,
                       "sign": [1, 1, -1, -1, 1, 1, 1, 1], "inertia": [0.2, 0.1, 0.3, 0.4, 1.0, 1.0, 1.0, 1.0],
                       "step_size": [0.1] * 8})
    pp, cadence = hazard.person_periods(tr)
    assert cadence == 1
    assert len(pp) == 6  # 3 periods per weight: the last sample (step 4) has no outcome
    w0 = pp[pp["index"] == 0].sort_values("step")
    assert w0["flipped"].tolist() == [False, True, False]  # the flip between steps 2 and 3 is the outcome of step 2
    assert w0["reflip"].tolist() == [False, False, True]
    assert w0["x"].tolist() == pytest.approx([2.0, 1.0, 3.0])  # inertia / layer's median step size 0.1
    # the unflipped weight's rows in the last steps are kept (no censoring bias)
    assert (pp[pp["index"] == 1]["step"].tolist()) == [1, 2, 3]


def test_person_periods_subsample_whole_weights():
    tr = hazard_run(0).tracked
    pp, _ = hazard.person_periods(tr, max_rows=len(tr) // 4)
    per_weight = pp.groupby(["layer", "index"]).size()
    assert 0 < len(per_weight) < 128 and (per_weight == 299).all()  # whole time series kept


def test_step_size_falls_back_on_inertia_differences():
    tr = pd.DataFrame({"step": [1, 2, 3], "layer": "a", "index": 0, "sign": [1, 1, 1],
                       "inertia": [0.5, 0.3, 0.2]})
    pp, _ = hazard.person_periods(tr)
    # |Δinertia| = 0.2, 0.1 → per-step medians; x at step 2 = 0.3 / median(0.2, 0.1) = 2
    assert pp.set_index("step").loc[2, "x"] == pytest.approx(0.3 / 0.15)


def test_logistic_slope_recovers_a_known_odds_ratio():
    x = np.array([-2.0, 0.0, 2.0, 4.0])
    p = 1 / (1 + np.exp(-(-1.0 - 0.7 * x)))
    n = np.full(4, 1e6)
    assert hazard.logistic_slope(x, p * n, n) == pytest.approx(-0.7, abs=1e-6)
    assert math.isnan(hazard.logistic_slope([1.0, 1.0], [1, 2], [10, 10]))


def test_auc_hand_computed():
    assert hazard.auc([0.1, 0.2, 5.0, 6.0], [True, True, False, False]) == 1.0
    assert hazard.auc([1.0, 1.0], [True, False]) == 0.5


def _hazard_verdict(effect, seeds=(0, 1, 2)):
    bins, summary, _ = hazard.analyse([hazard_run(s, effect=effect) for s in seeds])
    (v,) = hazard.verdicts(bins, summary, n_boot=200)
    return v, summary


def test_hazard_supported_when_flips_need_inertia_below_a_step():
    v, summary = _hazard_verdict(True)
    assert (v.verdict, v.id) == (stats.SUPPORTED, "inertia.hazard")
    assert v.statistic < 0.7 and v.interval[1] < 1
    assert (summary["auc"] > 0.7).all()


def test_hazard_not_supported_for_random_flips_independent_of_inertia():
    v, summary = _hazard_verdict(False)
    assert v.verdict == stats.NOT_SUPPORTED
    assert v.interval[0] > hazard.NEGLIGIBLE_OR
    assert summary["auc"].between(0.4, 0.6).all()


def test_hazard_is_supported_by_a_real_valued_sgd_weight_too():
    """Why the hazard verdict cannot separate the views: a real-valued weight (nothing binarised, |w| as 'inertia')
    passes it as well."""
    bins, summary, _ = hazard.analyse([real_valued_sgd_run(s) for s in (0, 1, 2)])
    (v,) = hazard.verdicts(bins, summary, n_boot=100)
    assert v.verdict == stats.SUPPORTED and summary["flips"].min() > 20


def test_hazard_leaves_magnitude_reset_arms_out():
    runs = [hazard_run(s) for s in (0, 1, 2)]
    for r in runs:
        r.meta["config"] = {**r.meta["config"], "intervention": {"pair": "p", "role": "reset", "step": 5}}
    assert hazard.analyse(runs)[1].empty


def test_hazard_inconclusive_with_two_seeds():
    v, _ = _hazard_verdict(True, seeds=(0, 1))
    assert v.verdict == stats.INCONCLUSIVE


def test_hazard_families_are_not_pooled():
    runs = [hazard_run(s, family="latent") for s in (0, 1, 2)] + [hazard_run(s, family="bop", effect=False)
                                                                   for s in (0, 1, 2)]
    bins, summary, _ = hazard.analyse(runs)
    vs = {v.claim.split("(")[1].split(":")[0]: v.verdict for v in hazard.verdicts(bins, summary, n_boot=100)}
    assert vs == {"latent-sgd": stats.SUPPORTED, "bop": stats.NOT_SUPPORTED}


def test_hazard_arms_are_configurations_and_need_three_seeds_each():
    runs = [hazard_run(0), hazard_run(1)]
    runs[1].meta["config"] = {**runs[1].meta["config"], "lr": 9.0}  # another configuration: another arm
    bins, summary, _ = hazard.analyse(runs)
    (v,) = hazard.verdicts(bins, summary, n_boot=50)
    assert v.verdict == stats.INCONCLUSIVE and "no configuration with ≥ 3 seeds" in v.reason


# ---------------------------------------------------------------------------------------------------- Bop vs latent
def test_bop_vs_latent_kappa_hand_computed():
    a, b = bop_vs_latent_pair(0, overlap=False)
    o = bop_vs_latent.overlap(a, b)
    # independent subsets: κ ≈ 0, and H_shuf = |A| + |B| − 2|A||B|/n
    last = o.iloc[-1]
    fa = last["changed_bop"]
    assert last["hamming_shuffled"] == pytest.approx(2 * fa - 2 * (int(0.2 * 4096) ** 2 / 4096
                                                                    + int(0.2 * 16384) ** 2 / 16384))
    assert abs(last["kappa"]) < 0.05


@pytest.mark.parametrize("overlap,expected", [(True, stats.SUPPORTED), (False, stats.NOT_SUPPORTED)])
def test_bop_vs_latent_verdict(overlap, expected):
    runs = [r for s in (0, 1, 2) for r in bop_vs_latent_pair(s, overlap=overlap)]
    df, notes = bop_vs_latent.analyse(runs)
    assert not notes
    v = bop_vs_latent.verdict(df)
    assert (v.verdict, v.id) == (expected, "inertia.bop_vs_latent")


def test_bop_vs_latent_two_seeds_inconclusive():
    runs = [r for s in (0, 1) for r in bop_vs_latent_pair(s)]
    assert bop_vs_latent.verdict(bop_vs_latent.analyse(runs)[0]).verdict == stats.INCONCLUSIVE


# ---------------------------------------------------------------------------------------------------- pools
def test_dedupe_counts_identical_runs_once_and_keeps_different_ones():
    a = hazard_run(0)
    b = hazard_run(0)
    b.name = "copy"
    b.meta["tag"] = "another-study"
    b.meta["config"] = {**a.meta["config"], "tag": "another-study", "snapshot_every": 5}  # recording only
    c = hazard_run(1)
    kept, notes = pools.dedupe([a, b, c])
    assert [r.name for r in kept] == [a.name, c.name]
    assert "copy is the same run as" in notes[0]
    d = hazard_run(0)
    d.meta["config"] = {**a.meta["config"], "lr": 123.0}  # same hashes, different configuration: kept
    assert len(pools.dedupe([a, d])[0]) == 2


def test_mean_t_interval_hand_computed():
    lo, hi = stats.mean_t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half))


def test_arm_labels_name_configurations_uniquely():
    a, b = hazard_run(0), hazard_run(1)
    a.name, b.name = "latent-sgd-clip-s0", "latent-sgd-clip-s1"
    assert pools.arm(a) == pools.arm(b) and pools.arm(a)[1] == "latent-sgd-clip"  # seeds of one arm
    b.meta["config"] = {**b.meta["config"], "lr": 7.0}
    _, summary, _ = hazard.analyse([a, b])
    assert sorted(summary["family"]) == ["latent-sgd-clip", "latent-sgd-clip #2"]  # never pooled
    b.meta["config"] = {**b.meta["config"], "batch_norm": False}
    assert pools.arm(b)[1] == "latent-sgd (no batch norm): latent-sgd-clip"
