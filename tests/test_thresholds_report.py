"""The threshold-policy comparison section (bnn_probe.reports.threshold_policies) on synthetic runs with known
accuracies and flip-ratio spreads."""

from __future__ import annotations

import math

import pytest

from bnn_probe.reports import stats
from bnn_probe.reports import threshold_policies as TP
from bnn_probe.reports.synthetic import make_run


def _run(name, seed, acc, cfg, **kw):
    kw.setdefault("n_tracked", 4)
    r = make_run(name, seed=seed, n_steps=60, config=cfg, **kw)
    r.train = r.train.copy()
    r.train.loc[r.train.index[-1], "val_accuracy"] = acc
    return r


def test_cv_t_interval_and_welch_hand_computed():
    assert TP.cv([2.0, 2.0, 2.0]) == 0.0
    assert TP.cv([1.0, 2.0, 3.0, 6.0]) == pytest.approx(math.sqrt(3.5) / 3)  # mean 3, population var 3.5
    assert math.isnan(TP.cv([1.0]))
    m, lo, hi = TP.t_interval([0.9, 0.92, 0.94])
    assert m == pytest.approx(0.92) and hi - m == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
    d, lo, hi = TP.welch_interval([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])  # equal variances 1, n=3: df = 4
    assert d == 1.0 and hi - d == pytest.approx(2.776445 * math.sqrt(2 / 3), rel=1e-5)
    m, lo, hi = TP.t_interval([0.01, 0.05, 0.12])  # s = 0.0557: the t-interval reaches below 0 ...
    assert lo < 0 and TP.cv_interval([0.01, 0.05, 0.12]) == pytest.approx((m, 0.0, hi))  # ... a CV cannot


def test_variant_labels_from_config():
    def v(cfg, family="bop"):
        return TP.variant(make_run("x", family=family, n_steps=10, n_tracked=1, config=cfg))
    assert v({"threshold_policy": "global", "threshold": 1e-6}) == "global τ=1e-06"
    assert v({"threshold_policy": "fan-in", "fan_in_exponent": 0.5}) == "fan-in a=0.5"
    assert v({"threshold_policy": {"name": "calibrated"}, "target_flip_ratio": 1e-3}) == "calibrated r*=0.001"
    assert v({"threshold_policy": "global", "threshold": 1e-6, "batch_norm": False, "weight_scale": "fan_in"}) \
        == "global τ=1e-06 no-BN scale=fan_in"
    assert v({}, family="latent") == "latent adam"
    assert v({"variant": "mine"}) == "mine"
    assert v({"threshold_policy": "normalized"}) == "normalized"
    assert v({"threshold_policy": "normalized", "threshold_balance": 0.5}) == "normalized balance=0.5"
    # a policy object given to train() is recorded only in extra.threshold_policy: the label reads it from there
    rec = {"name": "normalized", "args": {"multiple": 0.1, "scale": "flow", "balance": 0.5}}
    assert v({"threshold_policy": "normalized", "threshold_scale": None, "extra": {"threshold_policy": rec}}) \
        == "normalized scale=flow balance=0.5"


def _study(gain):
    runs = []
    for s in range(4):
        base = 0.90 + 0.002 * s
        runs.append(_run(f"g1-{s}", s, base, {"threshold_policy": "global", "threshold": 1e-6}, m_slope=-0.5))
        runs.append(_run(f"g2-{s}", s, base - 0.05, {"threshold_policy": "global", "threshold": 1e-5},
                         threshold=1e-5, m_slope=-0.5))
        runs.append(_run(f"f-{s}", s, base + gain + 0.001 * (-1) ** s, {"threshold_policy": "fan-in"}, m_slope=0.0))
    return runs


def test_comparison_table_and_supported_verdict():
    res = TP.policy_comparison(_study(gain=0.03))
    t = res.table.set_index("variant")
    assert list(t.index) == ["global τ=1e-06", "global τ=1e-05", "fan-in a=0.5"]
    assert (t["n_seeds"] == 4).all()
    assert t.loc["global τ=1e-06", "val_acc_mean"] == pytest.approx(0.903)
    assert t.loc["fan-in a=0.5", "val_acc_mean"] == pytest.approx(0.933)
    # flip ratios: |m| ∝ fan_in^-0.5 under one τ spreads them across layers; m_slope = 0 gives equal ones
    assert t.loc["fan-in a=0.5", "cv_mean"] < 0.2 < t.loc["global τ=1e-06", "cv_mean"]
    v, vm = res.verdicts
    assert (v.id, vm.id) == ("thresholds.policies", "thresholds.policies.matched_flip_rate")
    # paired over the 4 shared seeds: differences 0.03 ± 0.001 → mean 0.03
    assert v.verdict == stats.SUPPORTED and v.statistic == pytest.approx(0.03, abs=1e-9)
    assert "beats global τ=1e-06" in v.reason and "Holm" in v.method
    c = res.comparisons.set_index("comparison")
    assert c.loc["best global τ", "n_shared_seeds"] == 4 and c.loc["best global τ", "reference"] == "global τ=1e-06"
    assert set(res.frozen["layer"]) == {"fc1.weight", "fc2.weight", "fc3.weight", "fc4.weight"}
    assert res.frozen["frozen_share"].between(0, 1).all()
    md = TP.markdown(res)
    assert "## Threshold policies" in md and "**supported**" in md and "93.3 %" in md


def test_comparison_not_supported_and_inconclusive():
    assert TP.policy_comparison(_study(gain=-0.03)).verdicts[0].verdict == stats.NOT_SUPPORTED
    runs = [r for r in _study(gain=0.0) if not r.name.startswith("f-") or r.name in ("f-0", "f-1")]
    v, _ = TP.policy_comparison(runs).verdicts
    assert v.verdict == stats.INCONCLUSIVE and "fewer than 3 shared seeds" in v.reason


def test_cv_reduction_pairs():
    before = [_run(f"g{s}", s, 0.9, {}, m_slope=-0.5) for s in range(2)]
    after = [_run(f"r{s}", s, 0.9, {}, m_slope=0.0) for s in range(2)]
    red = TP.cv_reduction(before, after)
    assert list(red["run_global"]) == ["g0", "g1"]
    assert (red["ratio"] < 0.5).all()


@pytest.mark.slow
def test_width_sweep_slope_and_report_section(tmp_path):
    from bnn_probe.reports import build_report

    runs = []
    for s in range(3):
        for w in (64, 256, 1024, 4096):
            # the second layer has fan-in W; |m| ∝ fan_in^-0.5 in the synthetic log
            layers = (("fc1.weight", 64, 64 * w), ("fc2.weight", w, w * 256), ("fc3.weight", 256, 2560))
            runs.append(make_run(f"W{w}-s{s}", seed=s, n_steps=40, n_tracked=2, layers=layers, m_slope=-0.5,
                                 noise=0.01, tag="thresholds-sweep", config={"seed": s}))
    sw = TP.width_sweep(runs)
    assert list(sw.points["layer"].unique()) == ["fc2.weight"] and len(sw.points) == 12
    m = sw.slopes.set_index("quantity").loc["median |m|"]
    assert m["slope"] == pytest.approx(-0.5, abs=0.02) and m["ci_lo"] < -0.5 < m["ci_hi"] and m["n"] == 12
    # the controlled sweep answers both fan-in claims: |m| falls with W, and at the batch-norm rate −0.5 (TOST)
    wide, law = TP.sweep_verdicts(sw)
    assert (wide.id, law.id) == ("thresholds.fan_in_controlled", "thresholds.fan_in_controlled.bn_prediction")
    assert wide.verdict == "supported" and "falls with W" in wide.claim and wide.n == 12
    assert law.verdict == "supported" and "TOST" in law.reason
    flat = TP.WidthSweep(sw.points, sw.slopes.assign(slope=0.01, ci_lo=-0.02, ci_hi=0.04))
    assert [v.verdict for v in TP.sweep_verdicts(flat)] == ["not supported", "not supported"]
    # −0.3 ± 0.05: clearly negative, but outside −0.5 ± 0.1
    shallow = TP.WidthSweep(sw.points, sw.slopes.assign(slope=-0.3, ci_lo=-0.35, ci_hi=-0.25))
    assert [v.verdict for v in TP.sweep_verdicts(shallow)] == ["supported", "not supported"]
    few = TP.WidthSweep(sw.points, sw.slopes.assign(widths="64,256"))
    assert [v.verdict for v in TP.sweep_verdicts(few)] == ["inconclusive", "inconclusive"]
    two_seeds = TP.WidthSweep(sw.points[sw.points["seed"] != 2], sw.slopes)
    assert [v.verdict for v in TP.sweep_verdicts(two_seeds)] == ["inconclusive", "inconclusive"]
    # the report gains the section, with its tables, when runs hold a sweep or per-layer policies
    small = list(runs)
    small += [_run(f"{k}-{s}", s, 0.9, {"threshold_policy": k}, n_tracked=2) for k in ("global", "fan-in")
              for s in range(2)]
    build_report(small, tmp_path / "rep", formats=("md",), progress=False)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Per-layer threshold policies compared" in md and "Width sweep slopes" in md
    for t in ("threshold_policies", "threshold_policies_layers", "width_sweep_slopes", "width_sweep_points",
              "threshold_policies_paired"):
        assert (tmp_path / "rep" / "tables" / f"{t}.csv").exists()
    assert (tmp_path / "rep" / "figures" / "width_sweep.png").exists()
    assert (tmp_path / "rep" / "figures" / "policies.png").exists()
    assert "Which fan-in result answers the question" in md
    verdicts = (tmp_path / "rep" / "verdicts.json").read_text()
    assert "Per-layer Bop thresholds raise validation accuracy" in verdicts
    assert "Controlled width sweep" in verdicts
    # and not otherwise
    build_report([make_run("plain", n_steps=20, n_tracked=2)], tmp_path / "rep2", formats=("md",), progress=False)
    assert "Per-layer threshold policies compared" not in (tmp_path / "rep2" / "report.md").read_text()


def _per_run(rows):
    import pandas as pd

    per_run = pd.DataFrame([{"run": f"{va}-{seed}", "dataset": "d", "model": "m", "variant": va, "policy": po,
                             "family": "bop", "seed": seed, "val_accuracy": a, "flip_ratio_network": fr}
                            for va, po, seed, a, fr in rows])
    table = (per_run.groupby(["dataset", "model", "variant", "policy", "family"], sort=False)["val_accuracy"]
             .mean().rename("val_acc_mean").reset_index())
    return per_run, table


def test_policy_verdict_is_not_not_supported_while_a_policy_cannot_be_tested():
    # fan-in: 3 shared seeds, no gain over the global τ; calibrated: one seed (no test) -> cannot decide
    rows = [("global τ=1e-6", "global", s, a, 1e-3) for s, a in enumerate((0.800, 0.801, 0.799))]
    rows += [("fan-in a=0.5", "fan-in", s, a, 1e-3) for s, a in enumerate((0.780, 0.782, 0.779))]
    rows += [("calibrated r*=1e-3", "calibrated", 0, 0.95, 1e-3)]
    per_run, table = _per_run(rows)
    v, comp = TP._verdict(per_run, table, "d", "m", TP.NEGLIGIBLE_ACCURACY)
    assert v.verdict == stats.INCONCLUSIVE and "fewer than 3 shared seeds" in v.reason, v
    # with the untestable policy gone, the same data say "not supported"
    keep = per_run["policy"] != "calibrated"
    v, comp = TP._verdict(per_run[keep], table[table["policy"] != "calibrated"], "d", "m", TP.NEGLIGIBLE_ACCURACY)
    assert v.verdict == stats.NOT_SUPPORTED, v
    # paired by hand: d = (−0.020, −0.019, −0.020), mean −0.019667
    assert comp["diff_mean"].iloc[0] == pytest.approx(-0.059 / 3)


def test_policy_verdict_pairs_seeds_and_applies_holm():
    """A seed effect (±0.05) that swamps an unpaired comparison, and a paired gain of exactly +0.01 per seed: the
    paired test finds it. With two policies Holm doubles the smallest p-value; with seeds that do not match there
    is nothing to pair."""
    seeds = range(5)
    base = [0.80 + 0.05 * (-1) ** s + 0.01 * s for s in seeds]
    rows = [("global τ=1e-6", "global", s, base[s], 1e-3) for s in seeds]
    rows += [("global τ=1e-5", "global", s, base[s] - 0.05, 1e-4) for s in seeds]
    rows += [("fan-in a=0.5", "fan-in", s, base[s] + 0.01 + 0.001 * (s % 2), 1e-3) for s in seeds]
    rows += [("normalized", "normalized", s, base[s] + 0.001 * (s % 2), 1e-4) for s in seeds]
    per_run, table = _per_run(rows)
    v, comp = TP._verdict(per_run, table, "d", "m", TP.NEGLIGIBLE_ACCURACY)
    assert v.verdict == stats.SUPPORTED and "fan-in" in v.reason
    c = comp.set_index("variant")
    assert c.loc["fan-in a=0.5", "p_holm"] == pytest.approx(min(1.0, 2 * c.loc["fan-in a=0.5", "p"]))
    assert c.loc["fan-in a=0.5", "diff_mean"] == pytest.approx(0.0104)
    # matched network-mean flip rate: "normalized" (1e-4) is compared with global τ=1e-5 (1e-4), not the best τ
    vm, cm = TP._verdict(per_run, table, "d", "m", TP.NEGLIGIBLE_ACCURACY, matched=True)
    assert cm.set_index("variant").loc["normalized", "reference"] == "global τ=1e-5"
    assert cm.set_index("variant").loc["normalized", "diff_mean"] == pytest.approx(0.0504)
    assert vm.id == "thresholds.policies.matched_flip_rate" and vm.verdict == stats.SUPPORTED
    # no gain anywhere (differences −0.01 ± 0.001): not supported
    rows2 = [r if r[1] != "fan-in" else (r[0], r[1], r[2], r[3] - 0.02, r[4]) for r in rows if r[1] != "normalized"]
    per_run2, table2 = _per_run(rows2)
    assert TP._verdict(per_run2, table2, "d", "m", TP.NEGLIGIBLE_ACCURACY)[0].verdict == stats.NOT_SUPPORTED
    # arms that share no seed cannot be paired
    rows3 = [(va, po, s + (10 if po != "global" else 0), a, fr) for va, po, s, a, fr in rows]
    per_run3, table3 = _per_run(rows3)
    v3, c3 = TP._verdict(per_run3, table3, "d", "m", TP.NEGLIGIBLE_ACCURACY)
    assert v3.verdict == stats.INCONCLUSIVE and (c3["n_shared_seeds"] == 0).all()


def test_holm_by_hand():
    # p = (0.01, 0.04, 0.03): sorted 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → monotone 0.06
    assert TP.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])


def test_welch_interval_claims_no_interval_without_spread():
    d, lo, hi = TP.welch_interval([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])
    assert d == pytest.approx(0.1) and math.isnan(lo) and math.isnan(hi)
    d, lo, hi = TP.welch_interval([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])  # means differ by 1, se = sqrt(2/3)
    assert d == pytest.approx(1.0) and lo < 1.0 < hi and hi - 1.0 == pytest.approx(1.0 - lo)
