"""``normalized(..., balance=κ)``: the allocation feedback from counted flips. The update rule by hand on a fake
optimizer whose flips we choose, a synthetic pair of layers where a scale of m cannot equalise the flip ratios and the
feedback does, exact resume, and the CLI option."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import run_cli
from test_thresholds_cli import TINY

import bnn_probe
from bnn_probe.errors import BnnProbeError
from bnn_probe.optim import Bop
from bnn_probe.optim import thresholds as T


class FlipN(torch.optim.Optimizer):
    """Flips the first ``flips[i]`` weights of group i at each step; m = 1 everywhere (mean|m| = 1)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.flips: list[int] = []

    @torch.no_grad()
    def step(self, closure=None):
        for g, f in zip(self.param_groups, self.flips, strict=True):
            for p in g["params"]:
                self.state[p].setdefault("exp_avg", torch.ones_like(p))
                p[:f] *= -1


def _fake(sizes=(10, 100), **kw):
    ws = [torch.nn.Parameter(torch.ones(n)) for n in sizes]
    opt = FlipN([{"params": [w], "threshold": 1.0, "layer": f"l{i}"} for i, w in enumerate(ws)])
    ctl = T.MomentumScaleThreshold(opt, multiple=1.0, beta=1.0, every=1, **kw)
    return opt, ctl


def test_balance_update_hand_computed():
    opt, ctl = _fake(balance=0.5)
    opt.flips = [2, 2]
    opt.step()  # no m before: τ stays 1; 2 flips in each layer counted by the post-step hook
    assert [g["threshold"] for g in opt.param_groups] == [1.0, 1.0]
    opt.step()
    # first measurement (mean|m| = 1) with step 1's window: F = [2, 2], N = [10, 100]; r = [2.5/10, 2.5/100]:
    # log r differ by ln 10, e = ±ln10/2; step = min(κ|e|, u) with the first trust size u = 0.05 → c = e^±0.05
    first = T.MomentumScaleThreshold.BALANCE_FIRST_STEP
    assert first == 0.05 and 0.5 * math.log(10) / 2 > first
    assert [g["threshold"] for g in opt.param_groups] == pytest.approx([math.exp(0.05), math.exp(-0.05)])
    opt.flips = [0, 20]
    opt.step()
    # step 2's window: F = [½·2 + 2, ½·2 + 2] = [3, 3], N = [15, 150] → same errors, same sign: u = 1.2·0.05
    assert [g["threshold"] for g in opt.param_groups] == pytest.approx([math.exp(0.11), math.exp(-0.11)])
    opt.step()
    # F = [1.5 + 0, 1.5 + 20], N = [17.5, 175]: r = [2/17.5, 22/175]; e changes sign in both → u halves to 0.03
    r0, r1 = 2 / 17.5, 22 / 175
    e = (math.log(r0) - math.log(r1)) / 2
    assert e < 0
    step = min(0.5 * abs(e), 0.03)
    assert [g["threshold"] for g in opt.param_groups] == pytest.approx(
        [math.exp(0.11 - step), math.exp(-0.11 + step)])
    assert ctl._trust == pytest.approx([0.03, 0.03])
    assert sum(ctl.log_c) == pytest.approx(0.0)
    # balance = 0: the pure scale rule, no post-step hook
    opt0, ctl0 = _fake()
    opt0.flips = [2, 2]
    for _ in range(4):
        opt0.step()
    assert [g["threshold"] for g in opt0.param_groups] == [1.0, 1.0] and len(ctl0._handles) == 1


def _pair(balance: float, steps: int = 900):
    """Two layers of Gaussian gradients of the same variance; layer a's are autocorrelated in time (AR(1), ρ = 0.95),
    layer b's white. Its m moves at another pace per unit of mean|m|, so k·mean|m| leaves the flip ratios apart."""
    torch.manual_seed(0)
    n = 2000
    a, b = torch.nn.Parameter(torch.ones(n)), torch.nn.Parameter(torch.ones(n))
    bop = Bop([{"params": [a], "threshold": 1e-8, "layer": "a"}, {"params": [b], "threshold": 1e-8, "layer": "b"}],
              gamma=0.02)
    T.MomentumScaleThreshold(bop, multiple=0.5, beta=0.1, every=10, balance=balance)
    flips = {"a": 0.0, "b": 0.0}
    ar = torch.zeros(n)
    for t in range(steps):
        ar = 0.95 * ar + (1 - 0.95 ** 2) ** 0.5 * torch.randn(n)
        a.grad, b.grad = ar.clone(), torch.randn(n)
        old = (a.detach().clone(), b.detach().clone())
        bop.step()
        if t >= steps // 2:
            flips["a"] += float((a != old[0]).float().mean())
            flips["b"] += float((b != old[1]).float().mean())
    return flips["a"], flips["b"]


def test_balance_equalises_what_the_scale_cannot():
    ra, rb = _pair(0.0)  # flip ratios summed over the last half of the run
    assert rb > 0 and ra / rb < 0.5  # the scale rule alone: layer a flips less than half as often (measured 0.35)
    ra, rb = _pair(0.5)
    assert rb > 0 and 0.9 < ra / rb < 1.1  # with the feedback: within 10 % (measured 0.996)


def _resumable(restore_at=None, steps=12, load=True):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(8))
    v = torch.nn.Parameter(torch.ones(32))
    grads = [(torch.randn(8), 0.3 * torch.randn(32)) for _ in range(steps)]

    def build(w, v):
        opt = Bop([{"params": [w], "threshold": 10.0, "layer": "w"}, {"params": [v], "threshold": 10.0, "layer": "v"}],
                  gamma=0.5)
        return opt, T.MomentumScaleThreshold(opt, multiple=0.3, beta=0.3, every=2, balance=0.7)

    opt, ctl = build(w, v)
    taus = []
    for t, (gw, gv) in enumerate(grads):
        if t == restore_at:
            so, sc = opt.state_dict(), ctl.state_dict()
            w, v = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(v.detach().clone())
            opt, ctl = build(w, v)
            opt.load_state_dict(so)
            if load:
                ctl.load_state_dict(sc)
        w.grad, v.grad = gw, gv
        opt.step()
        taus += [g["threshold"] for g in opt.param_groups]
    return taus, ctl


def test_balance_resumes_exactly():
    taus, ctl = _resumable()
    assert any(abs(c) > 1e-3 for c in ctl.log_c)  # the feedback moved
    # without the controller's state the resumed τ differs (c_l restarts at 1)
    so_far, _ = _resumable(restore_at=4, load=False)
    assert so_far[:8] == taus[:8] and so_far[8:] != pytest.approx(taus[8:], rel=1e-6)
    for at in (3, 4, 7):  # mid-window and at a window's end
        taus_r, ctl_r = _resumable(restore_at=at)
        assert taus_r == pytest.approx(taus, rel=1e-12) and ctl_r.log_c == pytest.approx(ctl.log_c, rel=1e-12)
    bad = ctl.state_dict()
    bad["log_c"] = [0.0]
    with pytest.raises(BnnProbeError, match="log_c"):
        ctl.load_state_dict(bad)


def test_balance_options_and_cli(tmp_path, capsys):
    pol = T.normalized(1.0, balance=0.5)
    assert pol.args["balance"] == 0.5 and pol.controller_options["balance"] == 0.5
    assert "balance" not in T.normalized(1.0).args
    with pytest.raises(BnnProbeError, match="balance"):
        T.normalized(1.0, balance=-1)
    code, _, err = run_cli(["train", *TINY, "--epochs", "2", "--threshold-policy", "normalized",
                            "--threshold-balance", "0.5", "--threshold-every", "1", "--out", str(tmp_path / "n")],
                           capsys)
    assert code == 0, err
    run = bnn_probe.load_run(tmp_path / "n")
    ctl = run.meta["config"]["extra"]["threshold_policy"]["controller"]
    assert ctl["balance"] == 0.5 and ctl["every"] == 1
    st = run.steps.sort_values("step")
    # every = 1: τ changes at (nearly) every step, not only every 10th
    changes = st.groupby("layer")["threshold"].apply(lambda x: int((x.diff().fillna(0) != 0).sum()))
    assert (changes > st["step"].nunique() // 2).all()
    for bad in (["--threshold-every", "0", "--threshold-policy", "normalized"], ["--threshold-every", "3"]):
        code, _, err = run_cli(["train", *TINY, *bad, "--out", str(tmp_path / "e")], capsys)
        assert code == 2 and "threshold-every" in err and err.count("\n") == 1
    code, _, err = run_cli(["train", *TINY, "--threshold-balance", "0.5", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "normalized" in err and err.count("\n") == 1
