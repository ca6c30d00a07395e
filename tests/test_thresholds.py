"""Threshold policies (bnn_probe.optim.thresholds): hand-computed τ_l, from_report errors, and the calibrated
controller on a synthetic plant whose answer is known in closed form."""

from __future__ import annotations

import math

import pytest
import torch

from bnn_probe.errors import BnnProbeError
from bnn_probe.models import BinaryCNN1d, BinaryMLP
from bnn_probe.nn import named_binary_parameters
from bnn_probe.optim import thresholds as T


def test_global_is_reachable_by_its_keyword_name():
    assert getattr(T, "global") is T.global_threshold is T.global_ is T.POLICIES["global"]
    assert set(T.POLICIES) == {"global", "fan-in", "calibrated", "from-report", "normalized", "one-layer"}


def test_global_and_fan_in_thresholds_hand_computed():
    model = BinaryMLP(64, [2048, 64, 1024], 10)
    groups = T.global_threshold(1e-6).param_groups(named_binary_parameters(model), gamma=1e-3)
    assert [g["layer"] for g in groups] == ["fc1.weight", "fc2.weight", "fc3.weight", "fc4.weight"]
    assert [g["fan_in"] for g in groups] == [64, 2048, 64, 1024]
    assert all(g["threshold"] == 1e-6 and g["gamma"] == 1e-3 for g in groups)

    pol = T.fan_in(1e-6, reference_fan_in=64, exponent=0.5)
    taus = [g["threshold"] for g in pol.param_groups(named_binary_parameters(model))]
    # τ_l = 1e-6 · (64 / n_l)^0.5: n = 64 → 1e-6; 2048 → 1e-6/√32 = 1.767767e-7; 1024 → 1e-6/4 = 2.5e-7
    assert taus == pytest.approx([1e-6, 1.7677669529663689e-07, 1e-6, 2.5e-7], rel=1e-12)
    assert pol.describe() == {"name": "fan-in", "args": {"threshold": 1e-6, "reference_fan_in": 64, "exponent": 0.5},
                              "thresholds": {"fc1.weight": 1e-6, "fc2.weight": pytest.approx(1.7677669529663689e-07),
                                             "fc3.weight": 1e-6, "fc4.weight": 2.5e-7}}
    # exponent 1: τ ∝ 1/n
    taus1 = [g["threshold"] for g in T.fan_in(2e-6, 128, exponent=1.0).param_groups(named_binary_parameters(model))]
    assert taus1 == pytest.approx([4e-6, 1.25e-7, 4e-6, 2.5e-7])


def test_conv_fan_in_uses_kernel_size():
    model = BinaryCNN1d(channels=4, hidden=16)
    groups = T.global_threshold(0.0).param_groups(named_binary_parameters(model))
    # conv1 1→4 k5: 5; conv2 4→8 k3: 12; conv3 8→8 k3: 24; fc1: 8·10 = 80; fc2: 16
    assert {T.layer_name(g["layer"]): g["fan_in"] for g in groups} == {
        "features.conv1": 5, "features.conv2": 12, "features.conv3": 24, "classifier.fc1": 80, "classifier.fc2": 16}


def test_make_policy_defaults_reference_to_geometric_mean():
    pol = T.make_policy("fan-in", threshold=1e-6, fan_ins=[16, 1024])  # geometric mean 128
    assert pol.args["reference_fan_in"] == 128
    assert pol.threshold_for("x", 512) == pytest.approx(1e-6 * 0.5)
    with pytest.raises(BnnProbeError, match="target-flip-ratio"):
        T.make_policy("calibrated")
    with pytest.raises(BnnProbeError, match="thresholds-csv"):
        T.make_policy("from-report")
    with pytest.raises(BnnProbeError, match="unknown threshold policy"):
        T.make_policy("per-layer")
    with pytest.raises(BnnProbeError):
        T.global_threshold(-1.0)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_from_report_reads_tables_csv(tmp_path):
    _write(tmp_path / "rep" / "tables" / "thresholds.csv",
           "layer,fan_in,n_weights,flip_ratio,recommended_threshold\n"
           "fc1,64,4096,0.01,2e-6\nfc2.weight,2048,131072,0.001,3e-7\nfc3,64,640,0.02,1.5e-6\n")
    model = BinaryMLP(64, [2048, 64], 10)
    for path in (tmp_path / "rep", tmp_path / "rep" / "tables" / "thresholds.csv"):
        groups = T.from_report(path).param_groups(named_binary_parameters(model))
        assert [g["threshold"] for g in groups] == [2e-6, 3e-7, 1.5e-6]


@pytest.mark.parametrize("text,match", [
    (None, "not found"),
    ("layer,fan_in\nfc1,64\n", "missing column"),
    ("layer,recommended_threshold\n", "no rows"),
    ("layer,recommended_threshold\nfc1,abc\n", "line 2"),
    ("layer,recommended_threshold\nfc1,nan\n", "line 2"),
    ("layer,recommended_threshold\nfc1,-1e-6\n", "line 2"),
    ("layer,recommended_threshold\nfc1,1e-6\nfc1,2e-6\n", "more than once"),
])
def test_from_report_errors_are_one_line(tmp_path, text, match):
    path = tmp_path / "thresholds.csv"
    if text is not None:
        _write(path, text)
    with pytest.raises(BnnProbeError, match=match) as e:
        T.from_report(path)
    assert "\n" not in str(e.value)


def test_from_report_picks_a_run(tmp_path):
    path = _write(tmp_path / "t.csv", "run,layer,recommended_threshold,bound\n"
                  "a,fc1.weight,1e-6,\na,fc2.weight,2e-6,\nb,fc1.weight,3e-6,\nb,fc2.weight,,no flips in the window\n")
    with pytest.raises(BnnProbeError, match="holds 2 runs"):
        T.from_report(path)
    assert T.read_thresholds_csv(path, run="a") == {"fc1.weight": 1e-6, "fc2.weight": 2e-6}
    with pytest.raises(BnnProbeError, match="no flips in the window"):
        T.from_report(path, run="b")
    with pytest.raises(BnnProbeError, match="no run 'c'"):
        T.from_report(path, run="c")


def test_from_report_missing_layer(tmp_path):
    path = _write(tmp_path / "t.csv", "layer,recommended_threshold\nfc1,1e-6\n")
    with pytest.raises(BnnProbeError, match="no recommended threshold for layer 'fc2'"):
        T.from_report(path).param_groups(named_binary_parameters(BinaryMLP(8, [4], 2)))


# ---- the calibrated controller on a synthetic plant ------------------------------------------------------------

class FlipPlant(torch.optim.Optimizer):
    """Each step flips every weight independently with probability r(τ) = min(1, c · τ^−β) (per group).

    Its answer is known: the τ that gives flip ratio r* is τ* = (c / r*)^(1/β).
    """

    def __init__(self, groups, seed=0):
        super().__init__(groups, {})
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            prob = min(1.0, g["c"] * g["threshold"] ** -g["beta"])
            for p in g["params"]:
                flip = torch.rand(p.shape, generator=self.gen) < prob
                p.mul_(torch.where(flip, -1.0, 1.0))


def _run_plant(betas, cs, sizes, target, steps, tau0=1.0, **opts):
    params = [torch.nn.Parameter(torch.ones(n)) for n in sizes]
    groups = [{"params": [p], "threshold": tau0, "layer": f"l{i}", "c": c, "beta": b}
              for i, (p, c, b) in enumerate(zip(params, cs, betas, strict=True))]
    opt = FlipPlant(groups)
    ctl = T.FlipRatioController(opt, target_flip_ratio=target, **opts)
    traj = []
    for _ in range(steps):
        opt.step()
        traj.append([g["threshold"] for g in opt.param_groups])
    return ctl, torch.tensor(traj, dtype=torch.float64)


@pytest.mark.parametrize("beta", [1.0, 4.0, 10.0])
def test_controller_converges_to_known_threshold_without_oscillation(beta):
    target = 1e-3
    cs = [1e-3 * 10.0 ** beta, 1e-3 * 0.1 ** beta]  # τ* = 10 (a "thin" layer) and τ* = 0.1 (a "wide" layer)
    ctl, traj = _run_plant([beta, beta], cs, [20000, 50000], target, steps=1500, every=5)
    tau_star = torch.tensor([10.0, 0.1], dtype=torch.float64)
    log_err = (traj.log() - tau_star.log()).abs()
    # converged: the last third stays within 15 % of τ* (in log terms: |log τ − log τ*| < 0.14)
    assert log_err[1000:].max() < 0.14, log_err[1000:].max(0)
    # no oscillation: after it first reaches τ* it overshoots by less than the step cap (a factor 2), is within 10 %
    # of τ* 100 steps later, and beyond 25 % off target it crosses τ* at most twice (a damped, not a sustained swing)
    for j in range(2):
        e = traj[:, j].log() - tau_star[j].log()
        first = int((e.sign() != e[0].sign()).nonzero()[0])
        assert e[first:].abs().max() < math.log(2.0)
        assert e[first + 100:].abs().max() < math.log(1.1)
        big = e[e.abs() > math.log(1.25)]
        assert int((big[1:].sign() != big[:-1].sign()).sum()) <= 2
    # history (step s, τ) is the τ in force from step s + 1 on: traj[s] holds what step s + 1 used
    for s, taus in ctl.history[1:]:
        if s < len(traj):
            assert traj[s, 0].item() == taus["l0"] and traj[s, 1].item() == taus["l1"]
            assert traj[s - 1, 0].item() != taus["l0"] or traj[s - 1, 1].item() != taus["l1"]


def test_controller_multiplicative_updates_are_bounded():
    ctl, traj = _run_plant([2.0], [1.0], [1000], 1e-3, steps=400, every=1, min_flips=1.0, max_step=math.log(2.0))
    ratios = traj[1:, 0] / traj[:-1, 0]
    assert ratios.max() <= 2.0 + 1e-9 and ratios.min() >= 0.5 - 1e-9
    # from τ = 1 (r = 1) to τ* = (1/1e-3)^(1/2) ≈ 31.6: it gets there, and never overshoots past ×2
    assert traj[-1, 0] == pytest.approx(math.sqrt(1e3), rel=0.2)
    assert traj[:, 0].max() < 2 * math.sqrt(1e3)


def test_controller_clamps_and_handles_no_flips():
    w = torch.nn.Parameter(torch.ones(10))
    opt = torch.optim.SGD([{"params": [w], "threshold": 1e-11, "layer": "w"}], lr=0.0)
    ctl = T.FlipRatioController(opt, target_flip_ratio=0.1, every=1, min_flips=1.0, min_threshold=1e-12)
    for _ in range(20):
        opt.step()
    assert opt.param_groups[0]["threshold"] == pytest.approx(1e-12)
    assert len(ctl.history) >= 2
    ctl.remove()
    opt.step()
    with pytest.raises(BnnProbeError):
        T.FlipRatioController(torch.optim.SGD([w], lr=0.1), target_flip_ratio=0.1)


def test_calibrated_policy_attaches_controller():
    model = BinaryMLP(8, [16], 2)
    pol = T.calibrated(0.01, initial_threshold=1e-5, every=2)
    groups = pol.param_groups(named_binary_parameters(model))
    opt = torch.optim.SGD(groups, lr=0.0)
    ctl = pol.attach(opt)
    assert isinstance(ctl, T.FlipRatioController) and ctl.every == 2
    assert pol.describe()["controller"]["target_flip_ratio"] == 0.01
    assert T.global_threshold(1e-6).attach(opt) is None
