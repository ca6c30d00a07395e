"""Binary layers: sign convention, STEs, layer shapes, binary parameter discovery."""

import copy

import pytest
import torch

from bnn_probe.models import BinaryCNN1d, BinaryMLP, BinaryNet, build_model
from bnn_probe.nn import (
    BinaryActivation,
    BinaryConv2d,
    BinaryLinear,
    binarize,
    binary_parameters,
    mark_binary,
    named_binary_parameters,
    sign,
)


def test_sign_of_zero_is_plus_one():
    assert sign(torch.tensor([-0.0, 0.0, -1e-30, 1e-30])).tolist() == [1.0, 1.0, -1.0, 1.0]


def test_clipped_ste_gradient():
    x = torch.tensor([-1.5, -1.0, -0.2, 0.0, 1.0, 1.01], requires_grad=True)
    binarize(x, "clipped").backward(torch.arange(1.0, 7.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 0.0]


def test_identity_ste_gradient():
    x = torch.tensor([-3.0, 0.5, 7.0], requires_grad=True)
    binarize(x, "identity").backward(torch.tensor([1.0, 2.0, 3.0]))
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


def test_binary_activation_hardtanh_ste():
    x = torch.tensor([-2.0, -1.0, 0.3, 1.5], requires_grad=True)
    y = BinaryActivation()(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_binary_linear_uses_sign_of_weight():
    layer = BinaryLinear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.1, 0.0], [-2.0, 5.0, -0.5]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # sign(W) = [[1, -1, 1], [-1, 1, -1]]  →  [1 - 2 + 3, -1 + 2 - 3]
    assert layer(x).tolist() == [[2.0, -2.0]]


def test_scaling_modes():
    layer = BinaryLinear(4, 2, scale="fan_in")
    with torch.no_grad():
        layer.weight.fill_(1.0)
    assert torch.allclose(layer(torch.ones(1, 4)), torch.full((1, 2), 4 / 2.0))
    layer = BinaryLinear(2, 1, scale="mean")
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.5]]))
    # alpha = mean|w| = 1.0 ; sign(w) = [1, -1]
    assert layer(torch.tensor([[3.0, 1.0]])).item() == pytest.approx(2.0)


def test_bad_ste_and_scale_are_value_errors():
    with pytest.raises(ValueError, match="STE"):
        BinaryLinear(2, 2, ste="nope")
    with pytest.raises(ValueError, match="scale"):
        BinaryConv2d(2, 2, 3, scale="nope")


def test_binary_parameter_discovery_and_marking():
    model = BinaryMLP(64, [32, 16], 10)
    names = [n for n, _ in named_binary_parameters(model)]
    assert names == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert len(binary_parameters(copy.deepcopy(model))) == 3
    foreign = torch.nn.Linear(3, 3)
    mark_binary(foreign.weight)
    assert [n for n, _ in named_binary_parameters(foreign)] == ["weight"]


def test_reference_models_shapes_and_size():
    assert sum(p.numel() for p in binary_parameters(BinaryNet())) == 14_022_016
    assert BinaryNet(0.125)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert BinaryCNN1d()(torch.randn(3, 40)).shape == (3, 10)
    assert build_model("mlp", in_shape=(64,), num_classes=10, widths=[8])(torch.randn(2, 64)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", in_shape=(64,), num_classes=10)
