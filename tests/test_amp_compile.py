"""Mixed precision (bf16 autocast on CPU) and torch.compile with the probe attached."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import bnn_probe
from bnn_probe.data import load_digits
from bnn_probe.models import BinaryMLP
from bnn_probe.nn import binary_parameters
from bnn_probe.optim import binary_init_, bnn_optimizer
from bnn_probe.parallel import autocast, compile_model, grad_scaler, unwrap

STEPS = 12


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = BinaryMLP(64, [32], 10)
    binary_init_(model, seed=seed)
    return model, bnn_optimizer(model, gamma=1e-2, threshold=1e-6)


def _batches():
    d = load_digits()
    g = torch.Generator().manual_seed(3)
    return list(d.batches(64, g))[:STEPS]


def _train(model, opt, logdir, amp="none", fwd=None):
    fwd = fwd or model
    probe = bnn_probe.attach(unwrap(model), opt, logdir, tensorboard=False, hist_every=4)
    seen = []
    for x, y in _batches():
        with autocast("cpu", amp):
            out = fwd(x)
            loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        seen.append((out.dtype, [p.grad.dtype for p in model.parameters()]))
        opt.step()
    probe.close()
    return seen


def test_bf16_autocast_keeps_binary_weights_and_bop_state_fp32(tmp_path):
    model, opt = _setup()
    seen = _train(model, opt, tmp_path / "bf16", amp="bf16")
    assert all(dt == torch.bfloat16 for dt, _ in seen)  # autocast really ran the layers in bf16
    assert all(g == torch.float32 for _, gs in seen for g in gs)  # gradients reach the optimizer in fp32
    for p in binary_parameters(model):
        assert p.dtype == torch.float32
        assert torch.equal(p.abs(), torch.ones_like(p))  # still exactly ±1
        m = opt.state[p]["exp_avg"]
        assert m.dtype == torch.float32 and m.abs().sum() > 0
    for p in model.parameters():
        assert p.dtype == torch.float32
    run = bnn_probe.load_run(tmp_path / "bf16")
    assert run.status == "finished" and run.steps["step"].max() == STEPS
    assert run.steps["flips"].sum() > 0 and run.steps["abs_m_mean"].notna().all()


def test_autocast_options():
    with autocast("cpu", "none"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="amp must be one of"), autocast("cpu", "fp8"):
        pass
    assert grad_scaler("cpu", "bf16") is None
    assert isinstance(grad_scaler("cpu", "fp16"), torch.amp.GradScaler)


@pytest.mark.slow
def test_compiled_model_with_probe(tmp_path):
    eager, eopt = _setup()
    _train(eager, eopt, tmp_path / "eager")
    model, opt = _setup()
    compiled = compile_model(model)
    t0 = time.perf_counter()
    _train(model, opt, tmp_path / "compiled", fwd=compiled)
    print(f"compiled run of {STEPS} steps (compile included): {time.perf_counter() - t0:.1f} s")
    run = bnn_probe.load_run(tmp_path / "compiled")
    ref = bnn_probe.load_run(tmp_path / "eager")
    assert set(run.steps["layer"]) == {"fc1.weight", "fc2.weight"}  # names of the unwrapped module
    assert run.steps["step"].max() == STEPS and run.steps["flips"].sum() > 0
    # the compiled forward computes the same function; flips agree with eager up to rounding of near-τ weights
    a = run.steps.set_index(["step", "layer"])["flips"]
    b = ref.steps.set_index(["step", "layer"])["flips"]
    assert (a - b).abs().sum() <= max(2, int(0.01 * b.sum())), (a - b)[a != b]
    # attaching to the compiled wrapper itself also works (its parameters are the module's, prefixed)
    model2, opt2 = _setup()
    probe = bnn_probe.attach(compile_model(model2), opt2, tmp_path / "wrapped", tensorboard=False)
    assert [ly.name for ly in probe.layers] == ["_orig_mod.fc1.weight", "_orig_mod.fc2.weight"]
    probe.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_cuda_autocast_with_probe(tmp_path, amp):
    """CUDA autocast (fp16 with a GradScaler): binary weights, gradients and Bop state stay fp32; the probe logs."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = BinaryMLP(64, [256, 256], 10).to(dev)
    binary_init_(model, seed=0)
    opt = bnn_optimizer(model, gamma=1e-3, threshold=1e-6)
    probe = bnn_probe.attach(model, opt, tmp_path / amp, tensorboard=False, hist_every=5)
    scaler = grad_scaler(dev, amp)
    d = load_digits().to(dev)
    for x, y in list(d.batches(64, torch.Generator().manual_seed(0)))[:STEPS]:
        with autocast(dev, amp):
            out = model(x)
            loss = F.cross_entropy(out, y)
        assert out.dtype == (torch.bfloat16 if amp == "bf16" else torch.float16)
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    probe.close()
    for p in binary_parameters(model):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
        assert torch.equal(p.abs(), torch.ones_like(p))
        assert opt.state[p]["exp_avg"].dtype == torch.float32
    run = bnn_probe.load_run(tmp_path / amp)
    assert run.status == "finished" and run.steps["step"].max() == probe.step >= STEPS - 3  # fp16 may skip a few
    assert run.steps["flips"].sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_model_with_probe(tmp_path):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = BinaryMLP(64, [256, 256], 10).to(dev)
    binary_init_(model, seed=0)
    opt = bnn_optimizer(model, gamma=1e-3, threshold=1e-6)
    compiled = compile_model(model)
    probe = bnn_probe.attach(model, opt, tmp_path / "c", tensorboard=False)
    d = load_digits().to(dev)
    for x, y in list(d.batches(64, torch.Generator().manual_seed(0)))[:STEPS]:
        loss = F.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.close()
    run = bnn_probe.load_run(tmp_path / "c")
    assert run.steps["step"].max() == STEPS and run.steps["flips"].sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ste, expected", [("clipped", [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]),
                                           ("identity", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])])
def test_cuda_compiled_ste_gradient(ste, expected):
    """Regression: with ``torch.where(x >= 0, 1.0, -1.0)`` as the forward of the STE's autograd.Function,
    torch.compile on CUDA (torch 2.11, H200) returned an all-zero gradient and Bop never flipped."""
    from bnn_probe.nn import binarize

    w = torch.tensor([2.5, -0.7, -0.5, 0.125, 0.0, -1.5], device="cuda", requires_grad=True)
    coef = torch.arange(1.0, 7.0, device="cuda")
    y = torch.compile(lambda t: binarize(t, ste))(w)
    (y * coef).sum().backward()
    assert y.tolist() == [1.0, -1.0, -1.0, 1.0, 1.0, -1.0]
    assert w.grad.tolist() == expected
