"""Bop2ndOrder against the formulas of Suarez-Ramirez et al. 2021: a hand-computed step, and several steps against
a float64 reference written element by element."""

from __future__ import annotations

import math

import pytest
import torch

import bnn_probe.optim.bop2nd as b2
from bnn_probe.optim import Bop2ndOrder
from bnn_probe.optim.bop import CompiledKernel


def _param(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


@pytest.mark.parametrize("foreach", [False, True])
def test_hand_computed_first_step(foreach):
    # γ = 1/2, σ = 1/4, ε = 0, τ = 1/2; g = [2, 2, -2, 4]: m = [1, 1, -1, 2], v = g²/4 = [1, 1, 1, 4],
    # m̂ = m/sqrt(v) = [1, 1, -1, 1]; w·m̂ = [1, -1, -1, -1] -> only the first flips.
    w = _param([1.0, -1.0, 1.0, -1.0])
    opt = Bop2ndOrder([w], gamma=0.5, sigma=0.25, threshold=0.5, eps=0.0, foreach=foreach)
    w.grad = torch.tensor([2.0, 2.0, -2.0, 4.0])
    opt.step()
    assert torch.equal(opt.state[w]["exp_avg"], torch.tensor([1.0, 1.0, -1.0, 2.0]))
    assert torch.equal(opt.state[w]["exp_avg_sq"], torch.tensor([1.0, 1.0, 1.0, 4.0]))
    assert torch.equal(opt.normalized_momentum(w), torch.tensor([1.0, 1.0, -1.0, 1.0]))
    assert torch.equal(w.detach(), torch.tensor([-1.0, -1.0, 1.0, -1.0]))
    # boundary: τ = 1 and w·m̂ = 1 exactly does not flip
    u = _param([1.0])
    opt = Bop2ndOrder([u], gamma=0.5, sigma=0.25, threshold=1.0, eps=0.0, foreach=foreach)
    u.grad = torch.tensor([2.0])
    opt.step()
    assert u.item() == 1.0 and opt.normalized_momentum(u).item() == 1.0


def _reference(w0, grads, gamma, sigma, tau, eps, unbiased):
    """The paper's update, element by element in float64."""
    w, m, v = list(w0), [0.0] * len(w0), [0.0] * len(w0)
    out = []
    for g in grads:
        mh = []
        for i, gi in enumerate(g):
            m[i] = m[i] + gamma * (gi - m[i])
            v[i] = v[i] + sigma * (gi * gi - v[i])
            if unbiased:
                mh.append((m[i] / gamma) / (math.sqrt(v[i] / sigma) + eps))
            else:
                mh.append(m[i] / (math.sqrt(v[i]) + eps))
            if w[i] * mh[i] > tau:
                w[i] = -w[i]
        out.append((list(w), list(m), list(v), mh))
    return out


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "bias_corrected"])
@pytest.mark.parametrize("foreach", [False, True])
def test_several_steps_against_reference(unbiased, foreach):
    torch.manual_seed(0)
    n, gamma, sigma, tau, eps = 16, 0.1, 0.01, 0.3, 1e-10
    w0 = (torch.randint(0, 2, (n,)) * 2 - 1).tolist()
    grads = [torch.randn(n).tolist() for _ in range(12)]
    ref = _reference(w0, grads, gamma, sigma, tau, eps, unbiased)
    w = _param(w0)
    opt = Bop2ndOrder([w], gamma=gamma, sigma=sigma, threshold=tau, eps=eps, bias_correction=unbiased,
                      foreach=foreach)
    flips = 0
    for g, (w_ref, m_ref, v_ref, mh_ref) in zip(grads, ref, strict=True):
        before = w.detach().clone()
        w.grad = torch.tensor(g)
        opt.step()
        st = opt.state[w]
        torch.testing.assert_close(st["exp_avg"], torch.tensor(m_ref, dtype=torch.float32), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(st["exp_avg_sq"], torch.tensor(v_ref, dtype=torch.float32), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt.normalized_momentum(w), torch.tensor(mh_ref, dtype=torch.float32),
                                   rtol=1e-4, atol=1e-6)
        # same flips (no reference value sits within float32 rounding of τ for this seed)
        assert w.detach().tolist() == w_ref
        flips += int((before != w.detach()).sum())
    assert flips > 0
    assert Bop2ndOrder.bnn_family == "bop2nd"


def test_biased_and_unbiased_differ_by_rates():
    # at step 1: biased m̂ = γg/(sqrt(σ)|g|) = (γ/√σ)·sign(g); unbiased m̂ = sign(g) (ε = 0)
    for unbiased, expect in [(False, 0.5 / 0.5), (True, 1.0)]:
        w = _param([1.0])
        opt = Bop2ndOrder([w], gamma=0.5, sigma=0.25, threshold=10.0, eps=0.0, bias_correction=unbiased)
        w.grad = torch.tensor([3.0])
        opt.step()
        assert opt.normalized_momentum(w).item() == pytest.approx(expect)
    w = _param([1.0])
    opt = Bop2ndOrder([w], gamma=0.125, sigma=0.25, threshold=10.0, eps=0.0)
    w.grad = torch.tensor([3.0])
    opt.step()
    assert opt.normalized_momentum(w).item() == 0.25  # γ/√σ = 0.125/0.5


def test_per_group_and_scheduler():
    a, b = _param([1.0]), _param([1.0])
    opt = Bop2ndOrder([{"params": [a]}, {"params": [b], "sigma": 0.5, "threshold": 0.0}], gamma=0.5, sigma=0.25,
                      threshold=10.0, eps=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    a.grad, b.grad = torch.tensor([2.0]), torch.tensor([2.0])
    opt.step()
    sched.step()
    assert opt.state[a]["exp_avg_sq"].item() == 1.0 and opt.state[b]["exp_avg_sq"].item() == 2.0
    assert a.item() == 1.0 and b.item() == -1.0  # τ = 10 vs τ = 0
    assert [g["gamma"] for g in opt.param_groups] == [0.25, 0.25]
    a.grad = torch.tensor([2.0])
    opt.step()
    assert opt.state[a]["exp_avg"].item() == 0.75 * 1.0 + 0.25 * 2.0


@pytest.mark.parametrize("kwargs, name", [
    (dict(gamma=-0.1), "gamma"), (dict(sigma=math.nan), "sigma"), (dict(sigma=-1.0), "sigma"),
    (dict(threshold=math.inf), "threshold"), (dict(eps=-1.0), "eps"),
    (dict(bias_correction=True, sigma=0.0), "sigma"),
])
def test_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Bop2ndOrder([_param([1.0])], **kwargs)


def test_check_binary_sparse_and_unknown_param():
    w = _param([1.0, 0.3])
    opt = Bop2ndOrder([("conv1.weight", w)], check_binary=True)
    w.grad = torch.ones(2)
    with pytest.raises(ValueError, match="conv1.weight"):
        opt.step()
    v = _param([1.0])
    opt = Bop2ndOrder([v])
    v.grad = torch.ones(1).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="not a parameter"):
        opt.normalized_momentum(w)
    assert torch.equal(opt.normalized_momentum(v), torch.zeros(1))  # before any step


def test_fused_fallback_matches_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("nope")))
    monkeypatch.setattr(b2, "_FUSED", {False: CompiledKernel(b2._kernel, "Bop2ndOrder"),
                                       True: CompiledKernel(b2._kernel_unbiased, "Bop2ndOrder")})
    torch.manual_seed(1)
    w1 = _param((torch.randint(0, 2, (50,)) * 2 - 1).tolist())
    w2 = _param(w1.tolist())
    o1 = Bop2ndOrder([w1], gamma=0.1, sigma=0.1, threshold=0.5, fused=True)
    o2 = Bop2ndOrder([w2], gamma=0.1, sigma=0.1, threshold=0.5)
    for i in range(5):
        g = torch.randn(50)
        w1.grad, w2.grad = g.clone(), g.clone()
        if i == 0:
            with pytest.warns(RuntimeWarning):
                o1.step()
        else:
            o1.step()
        o2.step()
        assert torch.equal(w1, w2)


@pytest.mark.slow
def test_fused_compiled_matches_eager():
    torch.manual_seed(2)
    w1 = _param((torch.randint(0, 2, (64,)) * 2 - 1).tolist())
    w2 = _param(w1.tolist())
    o1 = Bop2ndOrder([w1], gamma=0.125, sigma=0.25, threshold=0.5, bias_correction=True, fused=True)
    o2 = Bop2ndOrder([w2], gamma=0.125, sigma=0.25, threshold=0.5, bias_correction=True)
    for _ in range(5):
        g = torch.randn(64)
        w1.grad, w2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
        assert torch.equal(w1, w2)
        torch.testing.assert_close(o1.normalized_momentum(w1), o2.normalized_momentum(w2))
    assert b2._FUSED[True].error is None


def _adam_reference(w0, grads, gammas, sigma, tau, eps):
    """Adam-style start-up correction by hand, element by element in float64: c_t = 1 − Π(1 − γ_s),
    d_t = 1 − (1 − σ)^t, m̂ = (m/c_t)/(sqrt(v/d_t) + ε)."""
    w, m, v = list(w0), [0.0] * len(w0), [0.0] * len(w0)
    pm = pv = 1.0
    out = []
    for g, gamma in zip(grads, gammas, strict=True):
        pm *= 1 - gamma
        pv *= 1 - sigma
        mh = []
        for i, gi in enumerate(g):
            m[i] = m[i] + gamma * (gi - m[i])
            v[i] = v[i] + sigma * (gi * gi - v[i])
            mh.append((m[i] / (1 - pm)) / (math.sqrt(v[i] / (1 - pv)) + eps))
            if w[i] * mh[i] > tau:
                w[i] = -w[i]
        out.append((list(w), mh))
    return out


def test_adam_bias_correction_step_by_step():
    """Against the hand computation, with γ changed half-way (the correction keeps the product of the rates)."""
    torch.manual_seed(1)
    n, sigma, tau, eps = 16, 0.05, 0.6, 1e-10
    gammas = [0.1] * 6 + [0.02] * 6
    w0 = (torch.randint(0, 2, (n,)) * 2 - 1).tolist()
    grads = [torch.randn(n).tolist() for _ in gammas]
    w = _param(w0)
    opt = Bop2ndOrder([w], gamma=gammas[0], sigma=sigma, threshold=tau, eps=eps, adam_bias_correction=True)
    flips = 0
    for g, gamma, (w_ref, mh_ref) in zip(grads, gammas, _adam_reference(w0, grads, gammas, sigma, tau, eps),
                                         strict=True):
        opt.param_groups[0]["gamma"] = gamma
        before = w.detach().clone()
        w.grad = torch.tensor(g)
        opt.step()
        torch.testing.assert_close(opt.normalized_momentum(w), torch.tensor(mh_ref, dtype=torch.float32),
                                   rtol=1e-4, atol=1e-6)
        assert w.detach().tolist() == w_ref
        flips += int((before != w.detach()).sum())
    assert flips > 0


def test_adam_bias_correction_first_step_is_sign_of_the_gradient():
    # t = 1: m/c = γg/γ = g, v/d = σg²/σ = g², so m̂ = g/|g| (ε = 0) whatever γ and σ; the biased form gives γ/√σ
    w = _param([1.0, 1.0])
    opt = Bop2ndOrder([w], gamma=0.01, sigma=0.0001, threshold=10.0, eps=0.0, adam_bias_correction=True)
    w.grad = torch.tensor([3.0, -0.5])
    opt.step()
    assert opt.normalized_momentum(w).tolist() == pytest.approx([1.0, -1.0])
    with pytest.raises(ValueError, match="exclude each other"):
        Bop2ndOrder([_param([1.0])], bias_correction=True, adam_bias_correction=True)


def test_paper_bias_correction_is_the_biased_rule_with_a_rescaled_threshold():
    """(m/γ)/(sqrt(v/σ)) > τ  ⇔  m/sqrt(v) > τ·γ/√σ (ε = 0): identical binary trajectories."""
    torch.manual_seed(2)
    n, gamma, sigma, tau = 64, 0.2, 0.01, 0.7
    w0 = (torch.randint(0, 2, (n,)) * 2 - 1).tolist()
    grads = [torch.randn(n) for _ in range(20)]
    a, b = _param(w0), _param(w0)
    oa = Bop2ndOrder([a], gamma=gamma, sigma=sigma, threshold=tau, eps=0.0, bias_correction=True)
    ob = Bop2ndOrder([b], gamma=gamma, sigma=sigma, threshold=tau * gamma / math.sqrt(sigma), eps=0.0)
    flips = 0
    for g in grads:
        before = a.detach().clone()
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
        assert torch.equal(a.detach(), b.detach())
        flips += int((before != a.detach()).sum())
    assert flips > 0


def test_adam_bias_correction_with_a_nonfinite_gradient_entry():
    """The skipped entry keeps m = v = 0; the others follow Adam's correction, the products advance once per step."""
    w = _param([1.0, 1.0])
    opt = Bop2ndOrder([w], gamma=0.1, sigma=0.01, threshold=10.0, eps=0.0, adam_bias_correction=True)
    w.grad = torch.tensor([2.0, float("nan")])
    opt.step()
    st = opt.state[w]
    assert st["bias_prod_m"] == pytest.approx(0.9) and st["bias_prod_v"] == pytest.approx(0.99)
    assert st["exp_avg"].tolist()[1] == 0.0 and st["exp_avg_sq"].tolist()[1] == 0.0
    assert opt.normalized_momentum(w).tolist()[0] == pytest.approx(1.0, rel=1e-5)  # (γg/γ)/sqrt(σg²/σ) = 1
