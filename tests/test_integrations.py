"""Adapters for bitorch, bnn and brevitas: attach(binary=None) finds the library's binary layers and logs per-step
flips equal to an independent recount of the signs its forward pass uses (tests/_interop.py)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from _interop import ForwardSigns, binary_modules, bitorch_net, bnn_net, brevitas_net, train

import bnn_probe

STEPS = 12


def _check(model, opt, tmp_path, expect_layers, **kw):
    probe = bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False, check_every=1, **kw)
    names = [ly.name for ly in probe.layers]
    assert names == expect_layers
    signs = ForwardSigns(binary_modules(model, names))
    train(model, opt, STEPS, signs)
    probe.close()
    steps = pd.read_parquet(tmp_path / "run" / "steps")
    recount = signs.flips()
    total = 0
    for name in names:
        logged = steps[steps.layer == name].sort_values("step")["flips"].tolist()
        assert logged == recount[name], name
        total += sum(logged)
    assert total > 0  # the comparison saw flips
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    layers = pd.read_parquet(tmp_path / "run" / "layers.parquet")
    return probe, meta, layers


@pytest.mark.parametrize("quant", ["sign", "steheaviside"])
def test_bitorch_flips_equal_forward_recount(tmp_path, quant):
    pytest.importorskip("bitorch")
    model = bitorch_net(quant)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    probe, meta, layers = _check(model, opt, tmp_path, ["conv1.weight", "fc.weight"])
    zero = {"sign": 1, "steheaviside": -1}[quant]
    assert all(ly.binarizer.zero == zero for ly in probe.layers)
    assert set(layers.module_type) == {"bitorch._QConv2dComposed", "bitorch._QLinearComposed"}
    assert set(layers.source) == {"bitorch"}
    assert meta["warnings"] == []


def test_bitorch_sign_of_zero(tmp_path):
    pytest.importorskip("bitorch")
    from bitorch.quantizations import Sign, SteHeaviside, WeightDoReFa

    from bnn_probe.integrations.bitorch import binarizer_of

    w = torch.tensor([[-0.5, 0.0, 0.25]])
    for q in (Sign(), SteHeaviside(), WeightDoReFa(bits=1)):
        assert binarizer_of(q).positive(w).tolist() == (q(w) > 0).tolist()
    assert binarizer_of(WeightDoReFa(bits=2)) is None


@pytest.mark.parametrize("center", [True, False])
def test_bnn_flips_equal_forward_recount(tmp_path, center):
    pytest.importorskip("bnn")
    model = bnn_net(center_weights=center)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    probe, meta, layers = _check(model, opt, tmp_path, ["2.weight", "6.weight"])
    assert set(layers.module_type) == {"bnn.Conv2d", "bnn.Linear"}
    assert all(ly.binarizer.keeps_zero for ly in probe.layers)
    assert [w["kind"] for w in meta["warnings"]] == []


def test_bnn_centering_differs_from_raw_sign(tmp_path):
    """With centring, sign(w) is not the forward sign: the probe counts what the forward pass uses."""
    pytest.importorskip("bnn")
    model = bnn_net(center_weights=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    probe = bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False)
    train(model, opt, 4)
    probe.close()
    w = model[2].weight.detach()
    forward = torch.sign(model[2].weight_pre_process(w))
    assert bool((forward != torch.where(w >= 0, 1.0, -1.0)).any())
    tracked = pd.read_parquet(tmp_path / "run" / "tracked")
    last = tracked[(tracked.layer == "2.weight") & (tracked.step == tracked.step.max())]
    idx = last["index"].to_numpy()
    assert last["sign"].tolist() == forward.reshape(-1).numpy()[idx].astype("int8").tolist()
    # latent inertia of a centred binarizer: |w - mean(w, dim=1)|
    centred = (w - w.mean(1, keepdim=True)).reshape(-1).double().numpy()
    assert last["inertia"].to_numpy() == pytest.approx(abs(centred[idx]))


def test_bnn_xnor_alpha_recorded_as_scale(tmp_path):
    """compute_alpha=True fails in bnn's own backward on this torch; its α is recorded as a scale (no training)."""
    pytest.importorskip("bnn")
    model = bnn_net(center_weights=True, compute_alpha=True)
    with pytest.raises(RuntimeError, match="inplace"):
        model(torch.randn(4, 1, 8, 8)).sum().backward()
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe = bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False, check_every=1)
    opt.step()
    probe.close()
    scales = pd.read_parquet(tmp_path / "run" / "scales")
    w = model[2].weight.detach()
    c = w - w.mean(1, keepdim=True)
    alpha = c.abs().reshape(c.shape[0], -1).mean(1).double()
    row = scales[scales.layer == "2.weight"].iloc[0]
    assert row.scale_mean == pytest.approx(float(alpha.mean()))
    assert row.scale_max == pytest.approx(float(alpha.max()))
    # the library's own α (forward without autograd) scales the same binary weights
    with torch.no_grad():
        out = model[2].weight_pre_process(w.clone())
    assert torch.allclose(out.abs().reshape(w.shape[0], -1).mean(1).double(), alpha, rtol=1e-5)


def test_brevitas_flips_equal_forward_recount(tmp_path):
    pytest.importorskip("brevitas")
    model = brevitas_net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    probe, meta, layers = _check(model, opt, tmp_path, ["4.weight", "7.weight"])
    assert set(layers.module_type) == {"brevitas.QuantLinear"}
    scales = bnn_probe.load_run(tmp_path / "run").scales
    assert set(scales.layer) == {"4.weight", "7.weight"}
    assert scales.scale_mean.tolist() == pytest.approx([0.1] * len(scales))
    # SignedBinaryWeightPerTensorConst clamps the weight parameter in place to [-0.1, 0.1] in every forward pass
    assert {(w["kind"], w["layer"]) for w in meta["warnings"]} == {("changed_outside_step", "4.weight"),
                                                                   ("changed_outside_step", "7.weight")}


def test_brevitas_per_channel_scale(tmp_path):
    pytest.importorskip("brevitas")
    model = brevitas_net(per_channel=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    probe, meta, layers = _check(model, opt, tmp_path, ["4.weight", "7.weight"])
    assert meta["warnings"] == []  # this quantizer clamps a copy, not the parameter
    scales = pd.read_parquet(tmp_path / "run" / "scales")
    last = scales[scales.step == scales.step.max()].set_index("layer")
    w = model[7].weight.detach().abs().mean(1).double()
    assert last.loc["7.weight", "scale_mean"] == pytest.approx(float(w.mean()), rel=1e-6)
    assert last.loc["7.weight", "scale_max"] == pytest.approx(float(w.max()), rel=1e-6)


def test_brevitas_const_scale_under_bop_warns(tmp_path):
    pytest.importorskip("brevitas")
    from bnn_probe.optim import Bop, CaseOptimizer

    model = brevitas_net()
    with torch.no_grad():
        for i in (4, 7):
            model[i].weight.copy_(torch.where(model[i].weight >= 0, 1.0, -1.0))
    bin_params = [model[4].weight, model[7].weight]
    rest = [p for p in model.parameters() if all(p is not q for q in bin_params)]
    opt = CaseOptimizer(Bop(bin_params, gamma=1e-3, threshold=1e-6), torch.optim.Adam(rest, lr=0.01))
    probe = bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False, check_every=1)
    train(model, opt, 3)
    probe.close()
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    kinds = {(w["kind"], w["layer"]) for w in meta["warnings"]}
    assert ("non_binary_weights", "4.weight") in kinds and ("non_binary_weights", "7.weight") in kinds


@pytest.mark.parametrize("center", [False, True])
def test_bnn_under_bop_dead_straight_through(tmp_path, center):
    """bnn's STE passes no gradient where |w| >= 1: without centring, ±1 weights under Bop never get one."""
    pytest.importorskip("bnn")
    from bnn_probe.optim import Bop, CaseOptimizer

    model = bnn_net(center_weights=center)
    bins = [model[2].weight, model[6].weight]
    with torch.no_grad():
        for p in bins:
            p.copy_(torch.where(p >= 0, 1.0, -1.0))
    rest = [p for p in model.parameters() if all(p is not q for q in bins)]
    opt = CaseOptimizer(Bop(bins, gamma=1e-3, threshold=1e-6), torch.optim.Adam(rest, lr=1e-2))
    probe = bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False, check_every=2)
    train(model, opt, 8)
    probe.close()
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    steps = pd.read_parquet(tmp_path / "run" / "steps")
    kinds = {(w["kind"], w["layer"]) for w in meta["warnings"]}
    if center:
        assert kinds == set() and steps.flips.sum() > 0
    else:
        assert kinds == {("dead_gradients", "2.weight"), ("dead_gradients", "6.weight")}
        assert steps.flips.sum() == 0
