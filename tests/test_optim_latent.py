"""Latent-weight baselines: clipping after each step, BinaryNet's Glorot learning-rate scaling."""

from __future__ import annotations

import math

import pytest
import torch

from bnn_probe.models import BinaryMLP
from bnn_probe.nn import BinaryConv2d, binary_parameters
from bnn_probe.optim import LatentClipper, clip_latent_weights, glorot_lr_scale, glorot_param_groups


def test_clip_latent_weights_values():
    a = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5])
    b = torch.tensor([[0.25, -0.75]])
    clip_latent_weights([a, b], bound=0.5)
    assert torch.equal(a, torch.tensor([-0.5, -0.5, -0.5, 0.0, 0.5, 0.5, 0.5]))
    assert torch.equal(b, torch.tensor([[0.25, -0.5]]))
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="bound"):
            clip_latent_weights([a], bound=bad)


def test_latent_clipper_clips_after_each_step_and_records_bound():
    model = BinaryMLP(4, [3], 2)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    clipper = LatentClipper(opt)  # default: the optimizer's binary parameters
    assert opt.bnn_clip_value == 1.0
    assert {id(p) for p in clipper.params} == {id(p) for p in binary_parameters(model)}
    bn_weight = model.bn1.weight
    for p in model.parameters():
        p.grad = torch.full_like(p, -1.0)  # SGD step +10: far beyond the bound
    opt.step()
    for p in binary_parameters(model):
        assert torch.equal(p.detach(), torch.ones_like(p))
    assert torch.equal(bn_weight.detach(), torch.full_like(bn_weight, 11.0))  # real-valued: not clipped
    clipper.remove()
    assert opt.bnn_clip_value is None
    opt.step()
    assert all((p > 1).all() for p in binary_parameters(model))
    with pytest.raises(ValueError, match="no parameters"):
        LatentClipper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0))


def test_glorot_lr_scale_values():
    # Linear (out 32, in 64): 1/sqrt(1.5/96) = 8; conv (out 4, in 2, 3×3): fan_in 18, fan_out 36: 1/sqrt(1.5/54) = 6
    assert glorot_lr_scale(torch.empty(32, 64)) == pytest.approx(8.0, rel=1e-12)
    assert glorot_lr_scale(BinaryConv2d(2, 4, 3).weight) == pytest.approx(6.0, rel=1e-12)
    with pytest.raises(ValueError, match="2 dimensions"):
        glorot_lr_scale(torch.empty(5))


def test_glorot_param_groups_one_per_binary_layer():
    model = BinaryMLP(64, [32], 10)
    groups = glorot_param_groups(model, lr=1e-3)
    assert [g["name"] for g in groups] == ["fc1.weight", "fc2.weight", "real-valued"]
    assert groups[0]["lr"] == pytest.approx(8e-3)  # fc1: 64 in, 32 out
    assert groups[1]["lr"] == pytest.approx(1e-3 * math.sqrt((32 + 10) / 1.5))  # fc2: 32 in, 10 out
    assert groups[2]["lr"] == 1e-3 and len(groups[2]["params"]) == 4  # bn1, bn2 weight + bias
    opt = torch.optim.Adam(groups)
    assert len(opt.param_groups) == 3
    named = glorot_param_groups(list(model.named_parameters()), lr=1.0, include_rest=False)
    assert [g["name"] for g in named] == ["fc1.weight", "fc2.weight"]
    with pytest.raises(ValueError, match="no binary"):
        glorot_param_groups(torch.nn.Linear(3, 2), lr=1.0)
