"""The ``normalized`` threshold policy (τ_l = k · EMA of layer l's mean |m|): hand computations on tiny tensors,
the EMA and its bias correction, the host-update cadence, tracking a layer whose gradient scale changes, Bop2ndOrder
(m̂), and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from test_thresholds_cli import TINY

import bnn_probe
from bnn_probe.errors import BnnProbeError
from bnn_probe.optim import Bop, Bop2ndOrder
from bnn_probe.optim import thresholds as T


def _layer(values, name="w", threshold=10.0):
    w = torch.nn.Parameter(torch.tensor(values))
    return w, {"params": [w], "threshold": threshold, "layer": name}


def _step(opt, *pairs):
    for w, g in pairs:
        w.grad = torch.tensor(g)
    opt.step()


def test_threshold_is_k_times_mean_abs_m_of_the_previous_step_hand_computed():
    a, ga = _layer([1.0, 1.0, -1.0, -1.0], "a")
    b, gb = _layer([1.0, -1.0], "b")
    bop = Bop([ga, gb], gamma=0.5)
    ctl = T.MomentumScaleThreshold(bop, multiple=3.0, beta=1.0, every=1)
    _step(bop, (a, [4.0, 0.0, 0.0, -2.0]), (b, [0.4, 0.4]))  # m_a = [2, 0, 0, -1], m_b = [0.2, 0.2]; τ = 10: no flip
    assert [g["threshold"] for g in bop.param_groups] == [10.0, 10.0] and a.tolist() == [1.0, 1.0, -1.0, -1.0]
    _step(bop, (a, [0.0, 0.0, 0.0, 0.0]), (b, [0.0, 0.0]))
    # τ_a = 3 · mean|m_a| = 3 · 0.75 = 2.25; τ_b = 3 · 0.2 = 0.6; m_a = [1, 0, 0, -0.5], w·m ≤ 1 < 2.25: no flip
    assert [g["threshold"] for g in bop.param_groups] == pytest.approx([2.25, 0.6])
    assert a.tolist() == [1.0, 1.0, -1.0, -1.0]
    assert ctl.history[-1] == (1, pytest.approx({"a": 2.25, "b": 0.6}))
    # rms scale: √((4 + 1)/4) = 1.118...
    a2, g2 = _layer([1.0, 1.0, -1.0, -1.0])
    bop2 = Bop([g2], gamma=0.5)
    T.MomentumScaleThreshold(bop2, multiple=1.0, beta=1.0, every=1, scale="rms")
    _step(bop2, (a2, [4.0, 0.0, 0.0, -2.0]))
    _step(bop2, (a2, [0.0, 0.0, 0.0, 0.0]))
    assert bop2.param_groups[0]["threshold"] == pytest.approx((5 / 4) ** 0.5)


def test_flip_decision_uses_the_normalised_threshold():
    w, g = _layer([1.0, 1.0, -1.0, -1.0])
    bop = Bop([g], gamma=0.5)
    T.MomentumScaleThreshold(bop, multiple=0.5, beta=1.0, every=1)
    _step(bop, (w, [4.0, 0.0, 0.0, -2.0]))  # m = [2, 0, 0, -1]
    _step(bop, (w, [0.0, 0.0, 0.0, 0.0]))  # τ = 0.5 · 0.75 = 0.375; m = [1, 0, 0, -0.5]; w·m = [1, 0, 0, 0.5]
    assert w.tolist() == [-1.0, 1.0, -1.0, 1.0]  # both exceed 0.375 and flip


def test_ema_bias_correction_and_update_cadence_hand_computed():
    w, g = _layer([1.0, 1.0])
    bop = Bop([g], gamma=1.0)  # γ = 1: m_t = g_t, so mean|m_t| is the mean |g_t| we feed
    ctl = T.MomentumScaleThreshold(bop, multiple=1.0, beta=0.5, every=2)
    seen = []
    for scale in (2.0, 4.0, 8.0, 16.0, 32.0):
        _step(bop, (w, [-scale, -scale]))  # negative gradients along... w·m = −scale < τ: nothing flips
        seen.append(bop.param_groups[0]["threshold"])
    # step 1: no m yet → 10. step 2: first measurement a=2 → s = 2 (bias-corrected), host update (the first).
    # step 3: a=4 → e = 0.5·(0.5·2)+0.5·4... → e = 0.5·1 + 2 = 2.5? (e₁ = 1, c₁ = 0.5; e₂ = 0.5 + 2 = 2.5,
    #   c₂ = 0.75 → s = 3.333), but done = 2 steps, 2 % 2 == 0 → host update: 3.333.
    # step 4: a=8: e₃ = 1.25 + 4 = 5.25, c₃ = 0.875 → s = 6; done = 3: no host update, τ stays 3.333.
    # step 5: a=16: e₄ = 2.625 + 8 = 10.625, c₄ = 0.9375 → s = 11.333; done = 4: update.
    assert seen == pytest.approx([10.0, 2.0, 10 / 3, 10 / 3, 10.625 / 0.9375])
    assert ctl.scales()["w"] == pytest.approx(10.625 / 0.9375)
    assert [s for s, _ in ctl.history] == [0, 1, 2, 4]


def test_tracks_a_layer_whose_gradient_scale_changes():
    """Two layers with gradients N(0, σ_l²), σ_b = 100 σ_a; at step 600 layer a's gradients grow 100×. Under one τ the
    flip ratios differ by orders of magnitude; under ``normalized`` τ_a follows the change within ~2/γ steps and
    the two layers flip alike again."""
    def run(policy: str):
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.ones(4000))
        b = torch.nn.Parameter(torch.ones(4000))
        tau = 1e-3
        bop = Bop([{"params": [a], "threshold": tau, "layer": "a"}, {"params": [b], "threshold": tau, "layer": "b"}],
                  gamma=0.05)
        ctl = T.MomentumScaleThreshold(bop, multiple=1.5, beta=0.1, every=5) if policy == "normalized" else None
        flips = {"a": [], "b": []}
        taus = []
        for t in range(1200):
            sa = 1e-3 if t < 600 else 1e-1
            a.grad = sa * torch.randn(4000)
            b.grad = 1e-1 * torch.randn(4000)
            old = (a.detach().clone(), b.detach().clone())
            bop.step()
            flips["a"].append(float((a != old[0]).float().mean()))
            flips["b"].append(float((b != old[1]).float().mean()))
            taus.append(bop.param_groups[0]["threshold"])
        return flips, taus, ctl

    f_glob, _, _ = run("global")
    f_norm, taus, ctl = run("normalized")

    def mean(x, lo, hi):
        return sum(x[lo:hi]) / (hi - lo)

    before_a, before_b = mean(f_glob["a"], 300, 600), mean(f_glob["b"], 300, 600)
    assert before_a < 0.01 * before_b  # one τ: the small-gradient layer is practically frozen
    ra, rb = mean(f_norm["a"], 300, 600), mean(f_norm["b"], 300, 600)
    assert rb > 0 and 0.5 < ra / rb < 2  # normalised: both layers flip alike ...
    ra2, rb2 = mean(f_norm["a"], 900, 1200), mean(f_norm["b"], 900, 1200)
    assert 0.5 < ra2 / rb2 < 2  # ... and again after layer a's gradients grew 100×
    # τ_a tracked the change: ≈ 100× larger by the end, within 100 steps of it at least 10×
    assert taus[-1] / taus[550] == pytest.approx(100, rel=0.3)
    assert taus[700] / taus[550] > 10
    assert ctl.thresholds()["b"] == pytest.approx(taus[-1], rel=0.3)


def test_bop2nd_uses_the_normalised_momentum():
    w, g = _layer([1.0, 1.0])
    opt = Bop2ndOrder([g], gamma=0.5, sigma=0.5, threshold=10.0)
    T.MomentumScaleThreshold(opt, multiple=1.0, beta=1.0, every=1)
    _step(opt, (w, [-2.0, -4.0]))
    m_hat = opt.normalized_momentum(w)
    _step(opt, (w, [0.0, 0.0]))
    assert opt.param_groups[0]["threshold"] == pytest.approx(float(m_hat.abs().mean()))
    # m = γ g = [−1, −2], v = σ g² = [2, 8] → m̂ = m/√v = [−0.7071, −0.7071]
    assert float(m_hat.abs().mean()) == pytest.approx(0.5 ** 0.5, rel=1e-6)


def test_policy_describes_itself_and_rejects_bad_options():
    from bnn_probe.models import BinaryMLP
    from bnn_probe.nn import named_binary_parameters

    pol = T.make_policy("normalized", threshold=1e-7, threshold_multiple=1.5)
    groups = pol.param_groups(named_binary_parameters(BinaryMLP(16, [8], 4)), gamma=1e-3)
    assert all(g["threshold"] == 1e-7 for g in groups)
    d = pol.describe()
    assert d["name"] == "normalized" and d["args"]["multiple"] == 1.5 and d["controller"]["beta"] == 0.1
    assert isinstance(pol.attach(Bop(groups)), T.MomentumScaleThreshold)
    assert T.make_policy("normalized").args["multiple"] == T.DEFAULT_MULTIPLE
    for bad in (dict(multiple=0), dict(beta=0), dict(every=0), dict(scale="median")):
        with pytest.raises(BnnProbeError):
            T.normalized(**bad)


def test_normalized_from_the_cli(tmp_path, capsys):
    code, _, err = run_cli(["train", *TINY, "--epochs", "2", "--threshold-policy", "normalized",
                            "--threshold-multiple", "1.5", "--out", str(tmp_path / "n")], capsys)
    assert code == 0, err
    run = bnn_probe.load_run(tmp_path / "n")
    pol = json.loads((tmp_path / "n" / "meta.json").read_text())["config"]["extra"]["threshold_policy"]
    assert pol["name"] == "normalized" and pol["controller"]["multiple"] == 1.5
    st = run.steps
    first = st[st["step"] == st["step"].min()]
    assert (first["threshold"] == 1e-6).all()  # the first step: --threshold
    # replay the rule from the probe's own log: abs_m_mean at step t − 1 is mean|m_{t−1}|, what the pre-step hook
    # of step t measures; EMA β = 0.1 bias-corrected, host update at the first measurement and every 10 steps
    for layer, sub in st.sort_values("step").groupby("layer"):
        a, tau = sub["abs_m_mean"].to_numpy(), sub["threshold"].to_numpy()
        e = c = 0.0
        expected = 1e-6
        for t in range(1, len(a)):
            e, c = 0.9 * e + 0.1 * a[t - 1], 0.9 * c + 0.1
            if t == 1 or t % 10 == 0:
                expected = 1.5 * e / c
            assert tau[t] == pytest.approx(expected, rel=1e-5), (layer, t)
    code, _, err = run_cli(["train", *TINY, "--threshold-policy", "normalized", "--threshold-multiple", "-1",
                            "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "threshold-multiple" in err and err.count("\n") == 1
