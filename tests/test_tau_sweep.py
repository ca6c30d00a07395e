"""The one-layer τ sweep (bnn_probe.reports.tau_sweep): the optimum of a quadratic by hand, the verdict on synthetic
sweeps whose answer is known (wide layers need a smaller τ / do not / too few seeds / quick grid), the runs → points
table on synthetic run logs, the report section and the study grid."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bnn_probe.reports import stats
from bnn_probe.reports import tau_sweep as TS
from bnn_probe.reports.synthetic import make_run


def test_quadratic_optimum_by_hand():
    # y = (x − 0.25)² + 1 on x ∈ {−1, −0.5, 0, 0.5, 1}: vertex 0.25
    x = np.array([-1, -0.5, 0, 0.5, 1])
    assert TS.quadratic_optimum(x, (x - 0.25) ** 2 + 1) == (pytest.approx(0.25), "")
    # vertex 2 lies right of the grid: the right end, flagged
    assert TS.quadratic_optimum(x, (x - 2) ** 2) == (1.0, "edge")
    # concave: the lower end
    assert TS.quadratic_optimum(x, -(x - 0.2) ** 2) == (-1.0, "edge")
    assert math.isnan(TS.quadratic_optimum([0, 1], [1, 2])[0])


def _bn_law(fan_in):  # τ* ∝ fan_in^−1/2, 1 at fan-in 256
    return -0.5 * math.log10(fan_in / 256)


def test_verdict_supported_when_wide_layers_need_a_smaller_tau():
    res = TS.analyse(TS.synthetic_sweep(_bn_law, seeds=3))
    assert res.verdict.verdict == stats.SUPPORTED and res.verdict.id == "thresholds.one_layer_sweep"
    assert res.slope.slope == pytest.approx(-0.5, abs=0.05)
    assert res.slope.df == 5 - 1 - 1  # five layers, one network: the layer is the unit, not (layer, seed)
    fc2 = res.layers.set_index("layer").loc["fc2"]
    assert fc2["tau_star"] == pytest.approx(1e-6 * 10 ** _bn_law(2048), rel=0.05)
    assert fc2["tau_lo"] <= fc2["tau_star"] <= fc2["tau_hi"]
    # paired differences: at f = 10 the wide layer (optimum below 1) loses, by curvature · ((1 − x0)² − x0²)
    p = res.paired.set_index(["layer", "factor"]).loc[("fc2", 10.0)]
    x0 = _bn_law(2048)
    assert p["diff_loss"] == pytest.approx(0.05 * ((1 - x0) ** 2 - x0 ** 2), abs=0.005) and p["n_seeds"] == 3


def test_verdict_not_supported_when_the_optimum_does_not_depend_on_fan_in():
    res = TS.analyse(TS.synthetic_sweep(lambda n: 0.2, seeds=4))
    assert res.verdict.verdict == stats.NOT_SUPPORTED
    # and when wide layers need a LARGER τ
    res = TS.analyse(TS.synthetic_sweep(lambda n: 0.5 * math.log10(n / 256), seeds=3))
    assert res.verdict.verdict == stats.NOT_SUPPORTED and res.slope.slope > 0


def test_verdict_inconclusive_with_few_seeds_or_the_quick_grid():
    res = TS.analyse(TS.synthetic_sweep(_bn_law, seeds=2))
    assert res.verdict.verdict == stats.INCONCLUSIVE and "2 seed(s)" in res.verdict.reason
    quick = TS.synthetic_sweep(_bn_law, seeds=1, layers=(("fc1", 64), ("fc2", 2048)), factors=(0.1, 1.0, 10.0),
                               quick=True)
    res = TS.analyse(quick)
    assert res.verdict.verdict == stats.INCONCLUSIVE and "inconclusive (quick)" in res.verdict.reason
    # noise that swamps the effect: inconclusive, not a false "supported"
    res = TS.analyse(TS.synthetic_sweep(_bn_law, seeds=3, noise=0.2, curvature=0.01, seed=1))
    assert res.verdict.verdict != stats.SUPPORTED or res.verdict.interval[1] < 0


def _run(name, seed, layer=None, factor=1.0, loss=0.3, quick=False):
    extra = {}
    if layer is not None:
        extra = {"threshold_policy": {"name": "one-layer", "args": {"threshold": 1e-6, "layer": layer,
                                                                   "factor": factor}}}
    r = make_run(name, seed=seed, tag=TS.TAG + ("-quick" if quick else ""), n_steps=20, n_tracked=2,
                 layers=(("fc1.weight", 64, 640), ("fc2.weight", 2048, 4096)),
                 config={"extra": extra, "seed": seed, "widths": [2048, 8]})
    r.train = pd.DataFrame({"step": [10, 20], "epoch": [1, 2], "val_loss": [1.0, loss], "val_accuracy": [0.5, 0.9]})
    return r


def test_points_and_section_from_run_logs(tmp_path):
    runs = []
    for s in range(3):
        runs.append(_run(f"base-s{s}", s))
        for f in (0.1, 10.0):
            runs.append(_run(f"fc2-x{f}-s{s}", s, "fc2", f, loss=0.3 + (0.05 if f == 10 else -0.01)))
    runs.append(make_run("other", seed=0))  # not a sweep run: ignored
    pts = TS.sweep_points(runs)
    # the base run speaks for fc2 (the varied layer) only; three factors × three seeds
    assert set(pts["layer"]) == {"fc2"} and len(pts) == 9 and set(pts["fan_in"]) == {2048}
    assert sorted(pts["factor"].unique()) == [0.1, 1.0, 10.0]
    assert pts.loc[pts["factor"] == 10.0, "val_loss"].tolist() == pytest.approx([0.35] * 3)

    class W:
        def __init__(self):
            self.names = []

        def csv(self, name, df):
            self.names.append(name)
            return f"tables/{name}.csv"

        def fig(self, name):
            return tmp_path / f"{name}.png"

    w = W()
    sec, verdicts = TS.section(runs, w, None)
    assert sec is not None and (tmp_path / "tau_sweep.png").exists()
    assert verdicts[0].id == "thresholds.one_layer_sweep" and verdicts[0].verdict == stats.INCONCLUSIVE
    assert "tau_sweep_layers" in w.names
    assert TS.section([make_run("x")], w, None) == (None, [])


def test_study_grid_has_the_quick_and_full_sweeps():
    from bnn_probe.studies import StudyOptions, plan_study

    quick = [s for s in plan_study("thresholds", StudyOptions(quick=True)) if s.name.startswith("tau-sweep")]
    assert [s.name for s in quick] == ["tau-sweep-base-s0", "tau-sweep-fc2-x0.1-s0", "tau-sweep-fc2-x10-s0",
                                       "tau-sweep-fc1-x0.1-s0", "tau-sweep-fc1-x10-s0"]
    assert all(s.config.tag == TS.TAG + "-quick" for s in quick)
    full = [s for s in plan_study("thresholds", StudyOptions(seeds=(0, 1, 2))) if s.name.startswith("tau-sweep")]
    assert len(full) == 3 * (1 + 4 * 4)
    one = next(s.config for s in full if s.name == "tau-sweep-fc3-x0.333-s1")
    assert one.threshold_policy == "one-layer" and one.threshold_layer == "fc3.weight"
    assert one.threshold_layer_factor == pytest.approx(1 / 3) and one.seed == 1
    # the controlled width sweep runs at least 3 seeds even when one is asked for
    sweep = [s for s in plan_study("thresholds", StudyOptions()) if s.name.startswith("sweep-")]
    assert {s.config.seed for s in sweep} == {0, 1, 2}


def test_one_layer_policy_scales_only_the_named_layer():
    from bnn_probe.errors import BnnProbeError
    from bnn_probe.models import BinaryMLP
    from bnn_probe.nn import named_binary_parameters
    from bnn_probe.optim import thresholds as T

    model = BinaryMLP(64, [2048, 64], 10)
    pol = T.make_policy("one-layer", threshold=1e-6, threshold_layer="fc2.weight", threshold_layer_factor=3.0)
    taus = {g["layer"]: g["threshold"] for g in pol.param_groups(named_binary_parameters(model))}
    assert taus == pytest.approx({"fc1.weight": 1e-6, "fc2.weight": 3e-6, "fc3.weight": 1e-6})
    assert pol.describe()["args"] == {"threshold": 1e-6, "layer": "fc2", "factor": 3.0}
    with pytest.raises(BnnProbeError, match="no binary layer 'fc9'"):
        T.one_layer(1e-6, "fc9", 3.0).param_groups(named_binary_parameters(model))
    with pytest.raises(BnnProbeError):
        T.one_layer(1e-6, "fc2", 0.0)
    with pytest.raises(BnnProbeError, match="needs the name"):
        T.make_policy("one-layer", threshold=1e-6)
