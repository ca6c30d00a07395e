"""``normalized`` with a third-party Bop-like optimizer (m under another state key) and its controller state for
resumed runs: a controller restored from ``state_dict`` continues exactly like the uninterrupted one."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from bnn_probe.errors import BnnProbeError
from bnn_probe.optim import Bop
from bnn_probe.optim import thresholds as T


class ThirdPartyBop(torch.optim.Optimizer):
    """Bop's rule with m kept under ``state["momentum"]`` (as e.g. a library's own Bop would)."""

    def __init__(self, params, gamma: float = 0.5, threshold: float = 10.0, key: str = "momentum"):
        super().__init__(params, {"gamma": gamma, "threshold": threshold})
        self.key = key

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                m = st.setdefault(self.key, torch.zeros_like(p))
                m.mul_(1 - g["gamma"]).add_(p.grad, alpha=g["gamma"])
                p.mul_(torch.where(p * m > g["threshold"], -1.0, 1.0))


def _run(opt_cls, steps=6, restore_at=None, load_controller=True, **ctl_kw):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(8))
    grads = [torch.randn(8) for _ in range(steps)]
    opt = opt_cls([{"params": [w], "threshold": 10.0, "layer": "w"}], gamma=0.5)
    ctl = T.MomentumScaleThreshold(opt, multiple=0.5, beta=0.3, every=1, **ctl_kw)
    taus = []
    for t, g in enumerate(grads):
        if t == restore_at:  # "resume": a fresh optimizer and controller from the saved states
            saved_opt, saved_ctl, saved_w = opt.state_dict(), ctl.state_dict(), w.detach().clone()
            w = torch.nn.Parameter(saved_w)
            opt = opt_cls([{"params": [w], "threshold": 10.0, "layer": "w"}], gamma=0.5)
            opt.load_state_dict(saved_opt)
            ctl = T.MomentumScaleThreshold(opt, multiple=0.5, beta=0.3, every=1, **ctl_kw)
            if load_controller:
                ctl.load_state_dict(saved_ctl)
        w.grad = g
        opt.step()
        taus.append(opt.param_groups[0]["threshold"])
    return taus, w.detach().tolist(), ctl


def test_third_party_momentum_key():
    taus, _, ctl = _run(ThirdPartyBop, momentum_key="momentum")
    assert taus[0] == 10.0 and all(t != 10.0 for t in taus[1:])  # τ follows k·mean|m| from the second step
    assert ctl.scales()["w"] > 0
    with pytest.raises(BnnProbeError, match="no 'exp_avg'.*momentum"):  # the default key on that optimizer
        _run(ThirdPartyBop)
    pol = T.normalized(0.5, momentum_key="momentum")
    assert pol.args["momentum_key"] == "momentum" and pol.controller_options["momentum_key"] == "momentum"
    assert "momentum_key" not in T.normalized(0.5).args  # the default stays out of run configs
    with pytest.raises(BnnProbeError, match="momentum_key"):
        T.normalized(0.5, momentum_key="")


@pytest.mark.parametrize("opt_cls", [Bop, ThirdPartyBop])
def test_restored_controller_continues_like_the_uninterrupted_one(opt_cls):
    kw = {} if opt_cls is Bop else {"momentum_key": "momentum"}
    taus, w, ctl = _run(opt_cls, steps=8, **kw)
    taus_r, w_r, ctl_r = _run(opt_cls, steps=8, restore_at=4, **kw)
    assert taus_r == pytest.approx(taus, rel=1e-12) and w_r == w
    assert ctl_r.history == ctl.history and ctl_r.n_updates == ctl.n_updates
    # without the EMA state the resumed τ differs (the EMA restarts from the first measurement after the restart)
    taus_x, _, _ = _run(opt_cls, steps=8, restore_at=4, load_controller=False, **kw)
    assert taus_x[:4] == taus[:4] and taus_x[4:] != pytest.approx(taus[4:], rel=1e-6)


def test_runner_resume_restores_the_normalized_ema(tmp_path, monkeypatch):
    """A normalized run that crashes after the epoch-2 checkpoint and is resumed logs the same τ trajectory as the
    uninterrupted run (the EMA of |m| comes back from the checkpoint; without it τ would restart from the first
    measurement after the crash)."""
    import bnn_probe
    import bnn_probe.resume as R
    from bnn_probe.train import TrainConfig, resume_training, train

    cfg = dict(widths=(16,), epochs=4, batch_size=128, hist_every=0, snapshot_every=0, track=2, seed=1,
               gamma=1e-3, threshold=1e-6, threshold_policy="normalized", threshold_multiple=0.5)
    opts = dict(progress=False, checkpoint_every=2, tensorboard=False)
    ref = train(TrainConfig(**cfg), tmp_path / "ref", **opts)
    real_save = R.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_crash(state, path=None):
        out = real_save(state, path)
        if state.epoch == 2:
            raise Crash
        return out

    monkeypatch.setattr(R, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        train(TrainConfig(**cfg), tmp_path / "cut", **opts)
    monkeypatch.setattr(R, "save_checkpoint", real_save)
    ck = R.load_checkpoint(tmp_path / "cut")
    assert ck["epoch"] == 2 and len(ck["threshold_controllers"]) == 1 and ck["threshold_controllers"][0]["ema"]
    resume_training(tmp_path / "cut", progress=False, checkpoint_every=2, tensorboard=False)
    a, b = bnn_probe.load_run(ref), bnn_probe.load_run(tmp_path / "cut")
    ta = a.steps.set_index(["step", "layer"])["threshold"]
    tb = b.steps.set_index(["step", "layer"])["threshold"].reindex(ta.index)
    assert ta.nunique() > 2  # τ moved
    pd.testing.assert_series_equal(ta, tb)


def test_flow_scale_subtracts_the_overshoot_hand_computed():
    """scale="flow": τ = max(k·mean|m_{t−1}| − ρ·RMS(γ(g_t − m_{t−1})), 0), β = 1 so each measurement is used as is."""
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0, -1.0, -1.0]))
    bop = Bop([{"params": [w], "threshold": 10.0, "layer": "w"}], gamma=0.5)
    ctl = T.MomentumScaleThreshold(bop, multiple=1.0, beta=1.0, every=1, scale="flow")
    assert ctl.scale == "flow"
    w.grad = torch.tensor([4.0, 0.0, 0.0, -2.0])
    bop.step()  # m = [2, 0, 0, -1]; no state before: τ stays 10
    assert bop.param_groups[0]["threshold"] == 10.0
    w.grad = torch.tensor([2.0, 0.0, 0.0, 0.0])
    bop.step()  # pre-step: mean|m| = 0.75, Δm = 0.5·(g − m) = [0, 0, 0, 0.5] → RMS = 0.25
    assert bop.param_groups[0]["threshold"] == pytest.approx(0.75 - T.OVERSHOOT_RHO * 0.25)
    w.grad = torch.tensor([40.0, 0.0, 0.0, 0.0])
    bop.step()  # mean|m| = 0.625, Δm = 0.5·([40,0,0,0] − [2,0,0,−0.5]) → RMS = √(19² + 0.25²)/2 ≫: τ = 0
    assert bop.param_groups[0]["threshold"] == 0.0
    with pytest.raises(BnnProbeError, match="scale must be"):
        T.normalized(1.0, scale="nope")
    from bnn_probe.optim import Bop2ndOrder

    w2 = torch.nn.Parameter(torch.ones(3))
    b2 = Bop2ndOrder([{"params": [w2], "threshold": 1e-3, "layer": "w2"}])
    with pytest.raises(BnnProbeError, match="Bop2ndOrder"):
        T.MomentumScaleThreshold(b2, multiple=1.0, scale="flow")
