"""Bop against its formulas on tiny hand-computed tensors (γ and τ powers of two: every value exact in float32)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import bnn_probe.optim.bop as bop_mod
from bnn_probe.optim import Bop, cstep
from bnn_probe.optim.bop import CompiledKernel, bop_step_foreach, bop_step_loop

IMPLS = [dict(foreach=False), dict(foreach=True), dict(), dict(fused=True)]  # the last two: the C step on the CPU
IMPL_IDS = ["loop", "foreach", "default-c", "fused-c"]

# γ = 1/2, τ = 1/4, w_0 = [1, -1, 1, -1, 1]; m_t = m_{t-1}/2 + g_t/2; flip iff w·m > 1/4.
GRADS = [[1.0, 1.0, 0.5, -1.0, 0.0], [1.0, -1.0, 0.5, 0.0, -2.0], [-4.0, -1.0, 0.0, 0.0, 0.0]]
# step 1: m = [.5, .5, .25, -.5, 0],    w·m = [.5, -.5, .25(boundary), .5, 0]  -> flip 0, 3
# step 2: m = [.75, -.25, .375, -.25, -1], w·m = [-.75, .25(boundary), .375, -.25, -1] -> flip 2
# step 3: m = [-1.625, -.625, .1875, -.125, -.5], w·m = [1.625, .625, -.1875, -.125, -.5] -> flip 0, 1
EXPECTED_M = [[0.5, 0.5, 0.25, -0.5, 0.0], [0.75, -0.25, 0.375, -0.25, -1.0], [-1.625, -0.625, 0.1875, -0.125, -0.5]]
EXPECTED_W = [[-1.0, -1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 1.0, 1.0]]


def _param(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float32))


@pytest.mark.parametrize("impl", IMPLS, ids=IMPL_IDS)
def test_hand_computed_steps_with_flips_and_boundary(impl):
    w = _param([1.0, -1.0, 1.0, -1.0, 1.0])
    opt = Bop([w], gamma=0.5, threshold=0.25, **impl)
    for g, m_exp, w_exp in zip(GRADS, EXPECTED_M, EXPECTED_W, strict=True):
        w.grad = torch.tensor(g)
        opt.step()
        assert torch.equal(opt.state[w]["exp_avg"], torch.tensor(m_exp))
        assert torch.equal(w.detach(), torch.tensor(w_exp))


def test_boundary_exactly_at_threshold_does_not_flip():
    w = _param([1.0, -1.0])
    opt = Bop([w], gamma=2.0**-3, threshold=2.0**-5)
    w.grad = torch.tensor([0.25, -0.25])  # m = γ g = ±2^-5, w·m = 2^-5 = τ exactly
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, -1.0]))
    w.grad = torch.tensor([2.0**-5 + 2.0**-20, -(2.0**-5 + 2.0**-20)])  # m = ±(2^-5 + 2^-23): w·m just above τ
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([-1.0, 1.0]))


def test_per_group_hyperparameters():
    a, b = _param([1.0, 1.0]), _param([1.0, 1.0])
    opt = Bop([{"params": [a], "threshold": 0.5}, {"params": [b], "gamma": 0.25}], gamma=0.5, threshold=0.125)
    assert opt.param_groups[0]["gamma"] == 0.5 and opt.param_groups[0]["threshold"] == 0.5
    assert opt.param_groups[1]["gamma"] == 0.25 and opt.param_groups[1]["threshold"] == 0.125
    a.grad = torch.tensor([1.0, 0.5])
    b.grad = torch.tensor([1.0, 0.25])
    opt.step()
    assert torch.equal(opt.state[a]["exp_avg"], torch.tensor([0.5, 0.25]))  # γ = 1/2
    assert torch.equal(a.detach(), torch.tensor([1.0, 1.0]))  # 0.5 and 0.25 are not > τ = 0.5
    assert torch.equal(opt.state[b]["exp_avg"], torch.tensor([0.25, 0.0625]))  # γ = 1/4
    assert torch.equal(b.detach(), torch.tensor([-1.0, 1.0]))  # 0.25 > 0.125 flips, 0.0625 does not


def test_steplr_drives_gamma_and_gamma_key_follows():
    w = _param([1.0])
    opt = Bop([w], gamma=0.5, threshold=10.0)  # huge τ: no flips, only m
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    seen, ms = [], []
    for _ in range(4):
        seen.append(opt.param_groups[0]["gamma"])
        w.grad = torch.tensor([1.0])
        opt.step()
        sched.step()
        ms.append(opt.state[w]["exp_avg"].item())
    assert seen == [0.5, 0.5, 0.25, 0.25]
    # m: .5, .75, then γ = 1/4: .75·.75 + .25 = .8125, .8125·.75 + .25 = .859375
    assert ms == [0.5, 0.75, 0.8125, 0.859375]
    assert opt.param_groups[0]["lr"] == opt.param_groups[0]["gamma"] == 0.125


def test_lr_alias_both_ways_and_state_dict_roundtrip():
    w = _param([1.0, -1.0])
    opt = Bop([w], gamma=0.5)
    group = opt.param_groups[0]
    group["gamma"] = 0.25
    assert group["lr"] == 0.25
    group["lr"] = 0.125
    assert group["gamma"] == 0.125
    w.grad = torch.tensor([1.0, 1.0])
    opt.step()
    assert torch.equal(opt.state[w]["exp_avg"], torch.tensor([0.125, 0.125]))
    sd = copy.deepcopy(opt.state_dict())
    other = Bop([w], gamma=0.5)
    other.load_state_dict(sd)
    other.param_groups[0]["lr"] = 0.0625
    assert other.param_groups[0]["gamma"] == 0.0625
    assert torch.equal(other.state[w]["exp_avg"], torch.tensor([0.125, 0.125]))
    sd["param_groups"][0]["lr"] = 0.5  # gamma 0.125 in the same saved group: contradictory
    with pytest.raises(ValueError, match="alias"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="alias"):
        Bop([{"params": [w], "lr": 0.1, "gamma": 0.2}])
    assert Bop([{"params": [w], "lr": 0.1}]).param_groups[0]["gamma"] == 0.1


@pytest.mark.parametrize("kwargs, name", [
    (dict(gamma=-1e-4), "gamma"), (dict(gamma=math.nan), "gamma"), (dict(gamma=math.inf), "gamma"),
    (dict(gamma=1.5), "gamma"), (dict(threshold=-1e-8), "threshold"), (dict(threshold=math.inf), "threshold"),
    (dict(threshold=math.nan), "threshold"),
])
def test_bad_hyperparameters_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Bop([_param([1.0])], **kwargs)


def test_bad_group_hyperparameter_and_scheduler_set_value():
    w = _param([1.0])
    with pytest.raises(ValueError, match="threshold"):
        Bop([{"params": [w], "threshold": -1.0}])
    opt = Bop([w])
    opt.param_groups[0]["gamma"] = float("nan")
    w.grad = torch.tensor([1.0])
    with pytest.raises(ValueError, match=r"gamma \(param_groups\[0\]\)"):
        opt.step()


def test_check_binary_names_the_parameter():
    w = torch.nn.Parameter(torch.tensor([1.0, 0.5, -1.0]))
    opt = Bop([("fc1.weight", w)], check_binary=True)
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match="fc1.weight"):
        opt.step()
    assert torch.equal(w.detach(), torch.tensor([1.0, 0.5, -1.0]))  # nothing was changed
    v = _param([1.0, -1.0])
    opt = Bop([v], check_binary=True)
    v.grad = torch.ones(2)
    opt.step()  # binary: fine
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\]"):
        u = _param([0.0])
        o = Bop([u], check_binary=True)
        u.grad = torch.ones(1)
        o.step()


def test_sparse_gradient_raises():
    w = _param([1.0, -1.0])
    opt = Bop([w])
    w.grad = torch.tensor([1.0, 0.0]).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_skips_params_without_grad_and_returns_closure_loss():
    a, b = _param([1.0]), _param([1.0])
    opt = Bop([a, b], gamma=0.5, threshold=0.0)
    a.grad = torch.tensor([1.0])
    loss = opt.step(lambda: torch.tensor(3.0))
    assert loss.item() == 3.0
    assert b not in opt.state and a.item() == -1.0 and b.item() == 1.0
    assert Bop.bnn_family == "bop"


def test_foreach_is_bit_identical_to_loop_on_random_data():
    torch.manual_seed(0)
    shapes = [(7, 3), (300,), (5, 4, 3, 3), (1,)]
    ws = [torch.randint(0, 2, s).float() * 2 - 1 for s in shapes]
    ms = [torch.zeros(s) for s in shapes]
    w2, m2 = [w.clone() for w in ws], [m.clone() for m in ms]
    for _ in range(20):
        gs = [torch.randn(s) for s in shapes]
        bop_step_loop(ws, ms, gs, 0.3, 0.05)
        bop_step_foreach(w2, m2, gs, 0.3, 0.05, block=64)  # small blocks: exercises the cache blocking
        for a, b in zip(ws + ms, w2 + m2, strict=True):
            assert torch.equal(a, b)
    assert any((w != 1).any() for w in ws)


def test_fused_falls_back_to_eager_when_compile_fails(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(cstep, "kernels", lambda dtype: None)  # as without the C extension (or on a GPU)
    monkeypatch.setattr(bop_mod, "_FUSED_BOP", CompiledKernel(bop_mod._bop_kernel_multi, "Bop"))
    w = _param([1.0, -1.0, 1.0, -1.0, 1.0])
    opt = Bop([w], gamma=0.5, threshold=0.25, fused=True)
    for i, g in enumerate(GRADS):
        w.grad = torch.tensor(g)
        if i == 0:
            with pytest.warns(RuntimeWarning, match="no compiler here"):
                opt.step()
        else:
            opt.step()
        assert torch.equal(w.detach(), torch.tensor(EXPECTED_W[i]))
    with pytest.raises(ValueError, match="foreach and fused"):
        Bop([w], foreach=True, fused=True)


@pytest.mark.slow
def test_fused_compiled_matches_hand_computation():
    """The torch.compile path (compiles once, ~10-20 s on 2 CPU cores)."""
    w = _param([1.0, -1.0, 1.0, -1.0, 1.0])
    opt = Bop([w], gamma=0.5, threshold=0.25, fused=True)
    for g, m_exp, w_exp in zip(GRADS, EXPECTED_M, EXPECTED_W, strict=True):
        w.grad = torch.tensor(g)
        opt.step()
        assert torch.equal(opt.state[w]["exp_avg"], torch.tensor(m_exp))
        assert torch.equal(w.detach(), torch.tensor(w_exp))
    assert bop_mod._FUSED_BOP.error is None  # it really ran compiled


@pytest.mark.slow
def test_fused_compiled_steps_all_tensors_in_one_call_like_the_loop(monkeypatch):
    """The compiled multi-tensor path (as on a GPU: the C step switched off) on several tensors and two groups with
    their own γ, τ (dyadic values: every product exact, so equality is exact): one compiled call per group and step,
    results equal to the loop, a non-contiguous tensor on the loop path, and no recompilation when γ changes."""
    monkeypatch.setattr(cstep, "kernels", lambda dtype: None)
    calls = []
    real = bop_mod._FUSED_BOP

    def counting(*args):
        calls.append(len(args[0]))
        return real(*args)

    monkeypatch.setattr(bop_mod, "_FUSED_BOP", counting)
    torch.manual_seed(3)
    shapes = [(7, 3), (300,), (5, 4, 3, 3), (33,)]
    init = [(torch.randint(0, 2, s) * 2 - 1).float() for s in shapes]
    pa = [torch.nn.Parameter(w.clone()) for w in init]
    pb = [torch.nn.Parameter(w.clone()) for w in init]
    nc = torch.nn.Parameter(torch.ones(6, 4).t())  # non-contiguous
    nc_ref = torch.nn.Parameter(torch.ones(6, 4).t())
    hyper = [dict(gamma=0.5, threshold=0.25), dict(gamma=0.25, threshold=0.125)]
    fused = Bop([dict(params=pa[:2] + [nc], **hyper[0]), dict(params=pa[2:], **hyper[1])], fused=True)
    ref = Bop([dict(params=pb[:2] + [nc_ref], **hyper[0]), dict(params=pb[2:], **hyper[1])], foreach=False)
    for step in range(6):
        if step == 3:
            for opt in (fused, ref):
                opt.param_groups[1]["gamma"] = 0.5
        for a, b in zip(pa + [nc], pb + [nc_ref], strict=True):
            g = torch.randint(-8, 9, a.shape).float() / 8
            a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
        for a, b in zip(pa + [nc], pb + [nc_ref], strict=True):
            assert torch.equal(a, b)
            assert torch.equal(fused.state[a]["exp_avg"], ref.state[b]["exp_avg"])
    assert calls == [2, 2] * 6  # one call per group and step, over its contiguous tensors
    assert any((p != w).any() for p, w in zip(pa, init, strict=True))  # weights flipped
    assert real.error is None


needs_c = pytest.mark.skipif(cstep.kernels(torch.float32) is None, reason="the C extension is not built")


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_c_step_is_bit_identical_to_loop_with_nonfinite_entries_and_groups(dtype):
    """The C step (default on the CPU) against the loop reference, step by step on random data: two param groups
    with their own γ, τ, tensor sizes around the vector width, NaN/±inf gradient entries (m kept, counted)."""
    torch.manual_seed(1)
    shapes = [(7, 3), (300,), (5, 4, 3, 3), (1,), (33,)]
    init = [(torch.randint(0, 2, s) * 2 - 1).to(dtype) for s in shapes]
    pa = [torch.nn.Parameter(w.clone()) for w in init]
    pb = [torch.nn.Parameter(w.clone()) for w in init]
    hyper = [dict(gamma=0.3, threshold=0.05), dict(gamma=0.01, threshold=1e-3)]
    c = Bop([dict(params=pa[:2], **hyper[0]), dict(params=pa[2:], **hyper[1])])
    ref = Bop([dict(params=pb[:2], **hyper[0]), dict(params=pb[2:], **hyper[1])], foreach=False)
    skipped = 0
    for step in range(25):
        for a, b in zip(pa, pb, strict=True):
            g = torch.randn(a.shape, dtype=dtype)
            if step in (3, 7) and a.numel() > 1:
                g.view(-1)[0], g.view(-1)[-1] = float("nan"), float("inf")
                skipped += 2
            a.grad, b.grad = g.clone(), g.clone()
        v0 = [p._version for p in pa]
        c.step()
        ref.step()
        assert all(p._version > v for p, v in zip(pa, v0, strict=True))  # autograd sees the in-place change
        for a, b in zip(pa, pb, strict=True):
            assert torch.equal(a, b)
            assert torch.equal(c.state[a]["exp_avg"], ref.state[b]["exp_avg"])
            assert c.state[a].get("nonfinite_skipped", 0) == ref.state[b].get("nonfinite_skipped", 0)
    assert sum(c.state[p].get("nonfinite_skipped", 0) for p in pa) == skipped
    assert any((p != w).any() for p, w in zip(pa, init, strict=True))
    assert torch.isfinite(torch.cat([c.state[p]["exp_avg"].view(-1) for p in pa])).all()


@needs_c
def test_c_step_uses_torch_rounding_of_gamma_g():
    """m = fma(g, γ, (1 − γ) m) with γ not a power of two: equal to torch's mul_/add_(alpha) bit for bit."""
    torch.manual_seed(2)
    m0, g = torch.randn(1001) * 1e-3, torch.randn(1001)
    w = torch.nn.Parameter(torch.ones(1001))
    opt = Bop([w], gamma=1e-4, threshold=1e-8)
    opt.state[w]["exp_avg"] = m0.clone()
    w.grad = g
    opt.step()
    assert torch.equal(opt.state[w]["exp_avg"], m0.clone().mul_(1 - 1e-4).add_(g, alpha=1e-4))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_cuda_fused_triton_matches_hand_computation():
    """fused=True on CUDA: the one-launch Triton kernel (optim/bop_triton.py) against Algorithm 1 by hand."""
    from bnn_probe.optim import bop_triton

    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0], device="cuda"))
    opt = Bop([w], gamma=0.5, threshold=0.25, fused=True)
    for g, m_exp, w_exp in zip(GRADS, EXPECTED_M, EXPECTED_W, strict=True):
        w.grad = torch.tensor(g, device="cuda")
        opt.step()
        assert torch.equal(opt.state[w]["exp_avg"].cpu(), torch.tensor(m_exp))
        assert torch.equal(w.detach().cpu(), torch.tensor(w_exp))
    assert bop_triton.available()  # it really ran the kernel


@pytest.mark.gpu
@needs_cuda
def test_cuda_fused_triton_equals_foreach_bit_for_bit():
    """Random γ·g (not dyadic: rounding matters), tensors across several blocks and of odd sizes, two groups, a NaN
    and an inf gradient entry (skipped and counted, as on the other paths), γ changed mid-run: the Triton kernel
    (fused=True and the default on CUDA) gives the foreach path's m and flips exactly, with no host
    synchronisation in its step."""
    from bnn_probe.optim import bop_triton

    gen = torch.Generator().manual_seed(5)
    shapes = [(7, 3), (5000,), (64, 32, 3, 3), (2049,)]
    init = [(torch.randint(0, 2, s, generator=gen) * 2 - 1).float() for s in shapes]
    sets = [[torch.nn.Parameter(w.clone().cuda()) for w in init] for _ in range(3)]
    hyper = [dict(gamma=1e-2, threshold=3e-3), dict(gamma=3e-3, threshold=1e-3)]
    opts = [Bop([dict(params=ps[:2], **hyper[0]), dict(params=ps[2:], **hyper[1])], **kw)
            for ps, kw in zip(sets, [dict(fused=True), dict(), dict(foreach=True)], strict=True)]
    for step in range(30):
        if step == 10:
            for opt in opts:
                opt.param_groups[1]["gamma"] = 7e-3
        for k in range(len(shapes)):
            g = torch.randn(shapes[k], generator=gen) * 0.3
            if step == 4 and k == 1:
                g[17] = float("nan")
            if step == 6 and k == 1:
                g[18] = -float("inf")
            for ps in sets:
                ps[k].grad = g.cuda()
        torch.cuda.synchronize()
        for opt in opts[:2]:
            torch.cuda.set_sync_debug_mode("error")  # any host synchronisation inside the step raises
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        opts[2].step()
        for k in range(len(shapes)):
            for ps, opt in zip(sets[:2], opts[:2], strict=True):
                assert torch.equal(ps[k], sets[2][k])
                assert torch.equal(opt.state[ps[k]]["exp_avg"], opts[2].state[sets[2][k]]["exp_avg"])
    flips = sum(int((a.detach().cpu() != w).sum()) for a, w in zip(sets[0], init, strict=True))
    assert flips > 100
    assert opts[2].state[sets[2][1]]["nonfinite_skipped"] == 2
    assert opts[0].nonfinite_skipped(sets[0][1]) == 2 and opts[0].nonfinite_skipped(sets[0][0]) == 0
    assert "nonfinite_skipped" not in opts[1].state[sets[1][1]]  # on the device until folded:
    sd = opts[1].state_dict()
    assert sd["state"][1]["nonfinite_skipped"] == 2 and opts[1].nonfinite_skipped(sets[1][1]) == 2
    assert bop_triton.available()


@pytest.mark.gpu
@needs_cuda
def test_cuda_triton_kernel_on_views_off_16_byte_boundaries_equals_foreach():
    """Parameters that are views one float into their storage (not 16-byte aligned: the kernel's unhinted variant,
    scalar accesses) and aligned ones in the same step: the same m and flips as the foreach path."""
    from bnn_probe.optim import bop_triton

    gen = torch.Generator().manual_seed(9)
    sizes = [5000, 2048 * 2, 300]

    def params(offset: int) -> list[torch.nn.Parameter]:
        g2 = torch.Generator().manual_seed(1)
        return [torch.nn.Parameter((torch.randint(0, 2, (n + offset,), generator=g2) * 2 - 1).float().cuda()[offset:])
                for n in sizes]

    views, aligned, ref = params(1), params(0), params(0)
    assert all(p.data_ptr() % 16 == 4 for p in views)
    opts = [Bop(ps, gamma=1e-2, threshold=3e-3, **kw)
            for ps, kw in zip([views, aligned, ref], [dict(fused=True), dict(fused=True), dict(foreach=True)],
                              strict=True)]
    for _ in range(20):
        gs = [torch.randn(n, generator=gen) * 0.3 for n in sizes]
        for ps in (views, aligned, ref):
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.cuda()
        for opt in opts:
            opt.step()
        for k in range(len(sizes)):
            for ps, opt in zip([views, aligned], opts[:2], strict=True):
                assert torch.equal(ps[k], ref[k])
                assert torch.equal(opt.state[ps[k]]["exp_avg"], opts[2].state[ref[k]]["exp_avg"])
    assert sum(int((p.detach() != p0).sum()) for p, p0 in zip(ref, params(0), strict=True)) > 100
    assert bop_triton.available()


def test_device_side_nonfinite_counts_fold_into_the_state():
    """The CUDA kernel's per-tensor counters (Bop._device_skips) reach state[p]["nonfinite_skipped"] at state_dict()
    and nonfinite_skipped(), once; a load_state_dict drops counts that belong to the replaced state."""
    a, b = _param([1.0, -1.0]), _param([1.0])
    opt = Bop([a, b], gamma=0.5, threshold=0.25)
    a.grad, b.grad = torch.tensor([0.5, 0.5]), torch.tensor([0.5])
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # (a state_dict shares the state dicts)
    opt._device_skips[(id(a), id(b))] = ([a, b], torch.tensor([3, 0]))  # as the kernel leaves them
    assert "nonfinite_skipped" not in opt.state[a]
    sd = opt.state_dict()
    assert sd["state"][0]["nonfinite_skipped"] == 3 and "nonfinite_skipped" not in sd["state"][1]
    assert opt.nonfinite_skipped(a) == 3 and opt.nonfinite_skipped(b) == 0  # folded once, not twice
    opt._device_skips[(id(a), id(b))][1].add_(torch.tensor([0, 2]))
    opt.load_state_dict(saved)
    assert opt.nonfinite_skipped(a) == 0 and opt.nonfinite_skipped(b) == 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_bop_step_fused_function_takes_the_kernel_like_foreach():
    """The public ``bop_step_fused`` on CUDA float32 tensors (no counter of its own: the caller filtered non-finite
    entries) runs the Triton kernel and equals the foreach path."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(300,), (17, 5)]
    ws = [(torch.randint(0, 2, s, generator=gen) * 2 - 1).float().cuda() for s in shapes]
    ms = [torch.randn(s, generator=gen).cuda() * 1e-2 for s in shapes]
    w0 = [w.clone() for w in ws]
    w2, m2 = [w.clone() for w in ws], [m.clone() for m in ms]
    for _ in range(5):
        gs = [torch.randn(s, generator=gen).cuda() for s in shapes]
        bop_mod.bop_step_fused(ws, ms, gs, 0.1, 0.02)
        bop_step_foreach(w2, m2, gs, 0.1, 0.02)
        for a, b in zip(ws + ms, w2 + m2, strict=True):
            assert torch.equal(a, b)
    assert any((w != w_init).any() for w, w_init in zip(ws, w0, strict=True))  # weights flipped
