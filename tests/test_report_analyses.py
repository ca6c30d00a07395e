"""Analyses on synthetic logs whose right answers are known (including inconclusive ones)."""

import math

import numpy as np
import pandas as pd
import pytest

from bnn_probe.errors import BnnProbeError
from bnn_probe.reports import inertia, pairs, stats, thresholds, training
from bnn_probe.reports.synthetic import make_run

SMALL = {"n_steps": 80, "n_tracked": 32}


def _fams(runs):
    return [r.meta["family"] for r in runs]


# ------------------------------------------------------------------ inertia

def test_flip_outcomes_by_hand():
    # one weight tracked every 2 steps; sign changes between steps 4 and 6
    tr = pd.DataFrame({"step": [2, 4, 6, 8, 10], "layer": "l", "index": 0, "sign": [1, 1, -1, -1, -1],
                       "inertia": [5.0, 1.0, 9.0, 9.0, 9.0]})
    out, k = inertia.flip_outcomes(tr, k=2)
    assert k == 2
    # step 2: next change at 6 (> 2+2): no; step 4: change at 6: yes; 6, 8: no change before the end;
    # step 10: horizon past the last sample, no change seen -> censored (dropped)
    assert out["step"].tolist() == [2, 4, 6, 8]
    assert out["flipped"].tolist() == [False, True, False, False]
    out4, _ = inertia.flip_outcomes(tr, k=4)
    assert out4.set_index("step")["flipped"].to_dict() == {2: True, 4: True, 6: False}


def test_flip_probability_bins_fall_with_inertia_descriptive():
    runs = [make_run("bop", inertia_effect=1.5, seed=1, **SMALL)]
    fp = inertia.flip_probability(runs, n_boot=200)
    b = fp.bins[(fp.bins["run"] == "bop") & (fp.bins["layer"] == "fc1.weight")].sort_values("bin")
    assert b["p_flip"].iloc[0] > b["p_flip"].iloc[-1]
    assert (b["ci_lo"] <= b["p_flip"]).all() and (b["p_flip"] <= b["ci_hi"]).all()
    assert not hasattr(inertia, "inertia_verdicts")  # the ρ verdict is gone: a descriptive table only


def _scheduled(seed, rising=False):
    run = make_run(f"s{seed}", family="latent", schedule="step", seed=seed, **SMALL)
    if rising:  # the lr rises where the flip ratio falls: the claim is false
        st = run.steps
        run.steps = st.assign(lr=np.where(st["step"] > SMALL["n_steps"] // 2, 1e-3, 1e-4))
    return run


def test_schedule_effect_supported_with_three_seeds():
    se = inertia.schedule_effect([_scheduled(s) for s in (5, 6, 7)])
    assert (se.verdict.verdict, se.verdict.id) == (stats.SUPPORTED, "schedules.flip_ratio")
    assert se.verdict.statistic > 0 and se.verdict.n == 3


def test_schedule_effect_not_supported_when_flips_fall_as_the_lr_rises():
    se = inertia.schedule_effect([_scheduled(s, rising=True) for s in (5, 6, 7)])
    assert se.verdict.verdict == stats.NOT_SUPPORTED


def test_schedule_effect_one_seed_inconclusive():
    assert inertia.schedule_effect([_scheduled(5)]).verdict.verdict == stats.INCONCLUSIVE


def test_schedule_effect_ignores_per_layer_factors_constant_in_time():
    run = make_run("c", family="latent", seed=5, **SMALL)
    layer_no = run.steps["layer"].map({n: i for i, n in enumerate(run.layers["layer"])})
    run.steps = run.steps.assign(lr=1e-3 * (1 + layer_no))  # Glorot-like factors: differ by layer, not in time
    flat = inertia.schedule_effect([run])
    assert flat.verdict.verdict == stats.INCONCLUSIVE and flat.verdict.n == 0


def test_schedule_effect_counts_identical_runs_once():
    a, b = _scheduled(5), _scheduled(5)
    b.name = "copy"
    se = inertia.schedule_effect([a, b, _scheduled(6)])
    assert len(se.correlations) == 2 and se.verdict.verdict == stats.INCONCLUSIVE


def test_ema_horizon_note_for_short_bop_runs():
    notes = inertia.ema_horizon_notes([make_run("g", gamma=1e-3, **SMALL)])  # 80 steps × 1e-3 = 0.08
    assert len(notes) == 1 and "not tested" in notes[0]
    assert inertia.ema_horizon_notes([make_run("g", gamma=0.1, **SMALL)]) == []


def test_family_distributions_side_by_side():
    fd = inertia.family_distributions([make_run("b", **SMALL), make_run("l", family="latent", **SMALL)])
    assert set(fd.summary["family"]) == {"bop", "latent"}
    assert set(fd.summary["quantity"]) == {"flip_ratio", "inertia"}


# ------------------------------------------------------------------ thresholds / fan-in law

def _law(runs):
    return thresholds.fan_in_law(thresholds.layer_table(runs))


def test_fan_in_law_minus_half_supported():
    law = _law([make_run(n, seed=i, **SMALL) for i, n in enumerate("abc")])
    v = {x.id: x for x in law.verdicts}
    wide = v["thresholds.fan_in_pooled"]
    assert wide.verdict == stats.SUPPORTED and wide.statistic == pytest.approx(-0.5, abs=0.03)
    assert wide.n == 4  # four layers of one network, not 12 (layer, seed) points
    assert law.slopes.set_index("quantity").loc["median |m|", "df"] == 4 - 1 - 1
    assert v["thresholds.fan_in_pooled.bn_prediction"].verdict == stats.SUPPORTED
    assert v["thresholds.one_tau_wide_flip_less"].verdict == stats.SUPPORTED
    # two seeds: inconclusive, whatever the slope
    law2 = _law([make_run(n, seed=i, **SMALL) for i, n in enumerate("ab")])
    assert all(x.verdict == stats.INCONCLUSIVE for x in law2.verdicts)
    assert "< 3 seeds" in law2.verdicts[0].reason
    # three runs of ONE seed (other τ, same network) are not three seeds
    tab = thresholds.layer_table([make_run(n, seed=i, **SMALL) for i, n in enumerate("abc")])
    law3 = thresholds.fan_in_law(tab, seeds={"a": 0, "b": 0, "c": 0})
    assert law3.verdicts[0].verdict == stats.INCONCLUSIVE and "1 seed(s)" in law3.verdicts[0].reason


def test_fan_in_law_flat_is_not_supported():
    law = _law([make_run(n, m_slope=0.0, seed=i, **SMALL) for i, n in enumerate("abc")])
    v = {x.id: x for x in law.verdicts}
    assert v["thresholds.fan_in_pooled"].verdict == stats.NOT_SUPPORTED, v["thresholds.fan_in_pooled"]
    assert v["thresholds.fan_in_pooled.bn_prediction"].verdict == stats.NOT_SUPPORTED  # far outside −0.5 ± 0.1
    assert v["thresholds.one_tau_wide_flip_less"].verdict == stats.NOT_SUPPORTED


def test_fan_in_law_counts_layers_not_seeds():
    """Many seeds of a 4-layer network whose per-layer |m| scatter around a flat line: pooling (layer, seed) points
    would give a narrow interval (df = 4·S − S − 1); with the layer as the unit df = 2 and the scatter of the layers
    decides. Here the layer effects (depth, fan-out) are ±0.3 in log |m| and unrelated to fan-in."""
    rng = np.random.default_rng(0)
    fan = np.array([64.0, 256.0, 1024.0, 4096.0])
    layer_effect = np.array([0.3, -0.3, 0.3, -0.3])
    rows = []
    for s in range(20):
        y = np.exp(layer_effect - 0.1 * np.log(fan / 64) + rng.normal(0, 0.01, 4))
        rows += [{"run": f"r{s}", "family": "bop", "layer": f"l{i}", "fan_in": fan[i], "abs_m_q50": y[i],
                  "flip_ratio": 1e-3, "threshold": 1e-6} for i in range(4)]
    law = thresholds.fan_in_law(pd.DataFrame(rows))
    row = law.slopes.set_index("quantity").loc["median |m|"]
    assert row["n"] == 4 and row["df"] == 2 and row["n_seeds"] == 20
    # the point estimate is the same either way; the interval is honest about 4 layers
    naive = stats.loglog_slope(pd.DataFrame(rows)["fan_in"], pd.DataFrame(rows)["abs_m_q50"],
                               pd.DataFrame(rows)["run"])
    assert row["slope"] == pytest.approx(naive.slope)
    assert naive.interval[1] < 0 and row["ci_hi"] > 0  # pooled seeds: "supported"; layers as units: not shown
    assert law.verdicts[0].verdict == stats.INCONCLUSIVE


def test_fan_in_law_two_layers_is_inconclusive():
    law = _law([make_run("a", layers=(("a.weight", 64, 4096), ("b.weight", 1024, 8192)), **SMALL)])
    assert all(v.verdict == stats.INCONCLUSIVE for v in law.verdicts)
    assert "distinct fan-in" in law.verdicts[0].reason


def test_fan_in_law_latent_only_is_inconclusive():
    law = _law([make_run("l", family="latent", **SMALL)])
    (v,) = law.verdicts
    assert v.verdict == stats.INCONCLUSIVE and v.n == 0


def test_recommended_thresholds_follow_the_fan_in_law():
    lt = thresholds.layer_table([make_run("a", seed=1, noise=0.0, **SMALL)])
    rec = thresholds.recommended_thresholds(lt)
    t = rec.table
    assert list(t.columns[:5]) == ["run", "family", "layer", "fan_in", "n_weights"]
    slope = np.polyfit(np.log(t["fan_in"].astype(float)), np.log(t["recommended_threshold"].astype(float)), 1)[0]
    assert slope == pytest.approx(-0.5, abs=0.05)
    # the layer at the target flip ratio keeps (about) its threshold; explicit target 0 flips -> inf excluded
    assert rec.target["a"] == pytest.approx(float(np.median(t["flip_ratio"])))
    assert "thresholds = {" in rec.snippet and "bnn_probe.optim.Bop(" in rec.snippet


def test_tail_prob_and_inverse_round_trip():
    q = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    for x in (0.5, 1.0, 3.0, 8.0, 12.0, 40.0):
        g, _ = thresholds.tail_prob(x, q)
        x2, _ = thresholds.tail_inverse(g, q)
        assert x2 == pytest.approx(x, rel=1e-9)
    assert thresholds.tail_prob(4.0, q)[0] == pytest.approx(0.5)
    assert thresholds.tail_inverse(0.01, q)[1].startswith("extrapolated")


def test_tail_prob_with_zero_quantiles():
    """Weights with zero gradient keep m = 0, so the low |m| quantiles can be exactly 0 (digits' constant pixels).
    The segment from 0 is linear: G(x) = 0.75 + (0.5 - 0.75) · x / 5e-7 between the q25 = 0 and q50 = 5e-7 knots."""
    q = np.array([0.0, 0.0, 5e-7, 1e-6, 3e-6])
    g, flag = thresholds.tail_prob(4e-7, q)
    assert g == pytest.approx(0.75 - 0.25 * 0.8) and flag == ""
    assert thresholds.tail_inverse(g, q)[0] == pytest.approx(4e-7)
    assert thresholds.tail_prob(1e-6, np.zeros(5)) == (0.0, "all |m| quantiles are 0")


def test_thresholds_table_is_readable_by_the_from_report_policy(tmp_path):
    from bnn_probe.optim.thresholds import read_thresholds_csv

    lt = thresholds.layer_table([make_run("a", **SMALL)])
    rec = thresholds.recommended_thresholds(lt)
    p = tmp_path / "thresholds.csv"
    rec.table[["layer", "fan_in", "n_weights", "flip_ratio", "recommended_threshold", "run", "bound"]].to_csv(
        p, index=False)
    got = read_thresholds_csv(p)
    assert set(got) == set(rec.table["layer"]) and all(v > 0 for v in got.values())


def test_layer_table_never_flipped_and_chatter():
    lt = thresholds.layer_table([make_run("a", **SMALL)], chatter_min=3)
    assert lt["never_flipped"].between(0, 1).all() and lt["chattering"].between(0, 1).all()
    # wide layers (fewer flips) have more weights that never flipped
    assert lt.sort_values("fan_in")["never_flipped"].is_monotonic_increasing


# ------------------------------------------------------------------ pairs / compare

def test_compare_identical_and_diverging():
    a = make_run("a", seed=1, snapshot_every=20, **SMALL)
    same = make_run("b", seed=2, trajectory_seed=1, snapshot_every=20, **SMALL)
    late = make_run("c", seed=3, trajectory_seed=1, diverge_at=33, snapshot_every=20, **SMALL)
    c = pairs.compare_runs(a, same)
    assert c.first_difference_step is None and c.max_hamming == 0 and c.n_compared == 80 * 4
    d = pairs.compare_runs(a, late)
    assert d.first_difference_step == 33
    assert set(d.first_difference_by_layer.values()) == {33}
    assert d.max_hamming > 0
    h = d.hamming.groupby("step")["hamming"].sum()
    assert h.loc[20] == 0 and h.loc[40] > 0


def test_compare_different_architectures_raises():
    a = make_run("a", **SMALL)
    b = make_run("b", layers=(("fc1.weight", 64, 4096),), **SMALL)
    with pytest.raises(BnnProbeError, match="different architectures"):
        pairs.compare_runs(a, b)


def test_pairs_from_config_and_tags():
    runs = [make_run("t1a", seed=1, config={"pair": "theorem1", "pair_role": "a"}, **SMALL),
            make_run("t1b", seed=2, trajectory_seed=1, config={"pair": "theorem1", "pair_role": "b"}, **SMALL),
            make_run("bop0", seed=3, tag="tau0", **SMALL),
            make_run("lat0", seed=4, family="latent", tag="tau0-latent", **SMALL),
            make_run("other", seed=5, **SMALL)]
    res, notes = pairs.pair_verdicts(runs)
    by = {r.pair.kind: r for r in res}
    assert set(by) == {"theorem1", "tau0"} and not notes
    # a power-of-two Theorem-1 pair is a code check: compared, no verdict
    assert by["theorem1"].verdict is None and by["theorem1"].comparison.first_difference_step is None
    assert by["theorem1"].comparison.n_compared == 320
    v = by["tau0"].verdict
    assert (v.verdict, v.id, v.interval) == (stats.NOT_SUPPORTED, "tau0.equivalence", None)
    assert by["tau0"].comparison.first_difference_step == 1 and v.statistic == 0.0


def test_tau0_pair_identical_is_supported_without_an_interval():
    runs = [make_run("bop0", seed=3, tag="tau0", **SMALL),
            make_run("lat0", seed=4, trajectory_seed=3, family="latent", tag="tau0-latent", **SMALL)]
    (r,), _ = pairs.pair_verdicts(runs)
    assert (r.verdict.verdict, r.verdict.statistic, r.verdict.interval) == (stats.SUPPORTED, 1.0, None)
    assert "not a statistical test" in r.verdict.method


def test_pairs_skip_runs_of_the_theorem1_and_bop_vs_latent_experiments():
    runs = [make_run(f"t{i}", seed=i, tag="theorem1-scaling", config={"extra": {"theorem1": {"C": 3.0}}}, **SMALL)
            for i in range(3)]
    assert pairs.pair_verdicts(runs) == ([], [])


def test_pair_without_hashes_is_inconclusive():
    a = make_run("a", config={"pair": "p", "pair_role": "a"}, **SMALL)
    b = make_run("b", trajectory_seed=0, config={"pair": "p", "pair_role": "b"}, **SMALL)
    a.steps = a.steps.assign(sign_hash=pd.array([pd.NA] * len(a.steps), dtype="Int64"))
    (r,), _ = pairs.pair_verdicts([a, b])
    assert r.verdict.verdict == stats.INCONCLUSIVE and r.verdict.n == 0


# ------------------------------------------------------------------ training

def test_runs_table_marks_unfinished_runs():
    tr = training.analyse_training([make_run("ok", **SMALL), make_run("killed", status="running", **SMALL)])
    assert tr.runs.set_index("run").loc["killed", "status"] == "running"
    assert len(tr.warnings) == 1 and "killed" in tr.warnings[0]
    assert {"train_loss", "train_accuracy", "val_accuracy"} <= set(tr.curves["metric"])
    assert np.allclose(tr.network_flips["pi"], np.log(tr.network_flips["flip_ratio"] + math.exp(-9)))


def test_fan_in_law_flip_ratio_claim_ignores_runs_with_per_layer_thresholds():
    # one run whose layers have different τ (e.g. the fan-in policy): the flip-ratio slope falls steeply, but the
    # claim is "under one threshold", so this run cannot decide it; the |m| claims still use it
    fan = [16.0, 64.0, 256.0, 1024.0]
    tab = pd.concat([pd.DataFrame({"run": r, "family": "bop", "layer": [f"l{i}" for i in range(4)], "fan_in": fan,
                                   "abs_m_q50": [f ** -0.5 * k for f in fan], "flip_ratio": [1e-2 / f for f in fan],
                                   "threshold": [1e-3 * f ** -0.5 for f in fan]})
                     for r, k in (("p", 1.0), ("q", 1.01), ("s", 0.99))], ignore_index=True)
    v = {x.claim.split(" (")[0]: x for x in thresholds.fan_in_law(tab).verdicts}
    assert v["Wide layers need a smaller threshold than thin layers"].verdict == stats.SUPPORTED
    flip = v["Under one threshold, wide layers flip less than thin layers"]
    assert flip.verdict == stats.INCONCLUSIVE and flip.n == 0 and "one threshold" in flip.reason
    # the same run under one global τ decides it
    v = {x.claim.split(" (")[0]: x for x in thresholds.fan_in_law(tab.assign(threshold=1e-6)).verdicts}
    assert v["Under one threshold, wide layers flip less than thin layers"].verdict == stats.SUPPORTED
