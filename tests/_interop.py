"""Shared by the interop tests and benchmarks/bench_interop.py: small models of bitorch, bnn and brevitas on the digits
data, and an independent recount of the binary weights their forward passes use.

The recount does not ask any binarizer: a ``TorchFunctionMode`` records the weight argument of every
``linear``/``conv`` call of the forward pass (brevitas: the value of its QuantTensor), per binary module, and the flips
of step t are the weights whose sign(·) differs between the forward pass after step t and the one before it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_F = nn.functional
_WEIGHTED = {_F.linear, _F.conv1d, _F.conv2d, _F.conv3d}


def digits(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8×8 digits, scaled to [0, 1], as [n, 1, 8, 8] images and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.random.default_rng(seed).permutation(len(d.target))[:n]
    x = torch.tensor(d.images[idx] / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(d.target[idx], dtype=torch.int64)


class _Capture(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None
        self.seen: dict[str, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WEIGHTED and self.current is not None and self.current not in self.seen:
            w = kwargs.get("weight", args[1] if len(args) > 1 else None)
            w = getattr(w, "value", w)
            self.seen[self.current] = torch.sign(w.detach()).clone()
        return func(*args, **kwargs)


class ForwardSigns:
    """sign(weight argument) of each module in ``modules`` ({parameter name: module}) at each forward pass."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.mode = _Capture()
        self.passes: list[dict[str, torch.Tensor]] = []
        for name, mod in modules.items():
            mod.register_forward_pre_hook(lambda m, a, name=name: setattr(self.mode, "current", name))
            mod.register_forward_hook(lambda m, a, o: setattr(self.mode, "current", None))

    def forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.mode.seen = {}
        with self.mode:
            out = model(x)
        self.passes.append(dict(self.mode.seen))
        return out

    def flips(self) -> dict[str, list[int]]:
        """{layer: flips of steps 1..T} from T + 1 forward passes (the first before step 1)."""
        out: dict[str, list[int]] = {}
        for name in self.passes[0]:
            s = [p[name] for p in self.passes]
            assert all(bool((x != 0).all()) for x in s), f"{name}: the forward pass used weights equal to 0"
            out[name] = [int((a != b).sum()) for a, b in zip(s[:-1], s[1:], strict=True)]
        return out


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, signs: ForwardSigns | None = None,
          batch: int = 64) -> None:
    """``steps`` optimizer steps of cross-entropy on digits (a last forward pass after them for the recount)."""
    x, y = digits()
    for t in range(steps):
        i = slice((t * batch) % len(x), (t * batch) % len(x) + batch)
        out = signs.forward(model, x[i]) if signs else model(x[i])
        opt.zero_grad()
        _F.cross_entropy(out, y[i]).backward()
        opt.step()
    if signs:
        with torch.no_grad():
            signs.forward(model, x[:batch])


def bitorch_net(weight_quantization: str = "sign") -> nn.Module:
    from bitorch.layers import QConv2d, QLinear

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv0 = nn.Conv2d(1, 16, 3, padding=1)  # real-valued first layer
            self.bn0 = nn.BatchNorm2d(16)
            self.conv1 = QConv2d(16, 32, 3, padding=1, weight_quantization=weight_quantization,
                                 input_quantization="sign")
            self.bn1 = nn.BatchNorm2d(32)
            self.fc = QLinear(32 * 4 * 4, 10, weight_quantization=weight_quantization, input_quantization="sign")

        def forward(self, x):
            x = self.bn0(self.conv0(x))
            x = _F.max_pool2d(self.bn1(self.conv1(x)), 2)
            return self.fc(x.flatten(1))

    return Net()


def bnn_net(center_weights: bool = True, compute_alpha: bool = False) -> nn.Module:
    from bnn import BConfig, prepare_binary_model
    from bnn.bconfig import Identity
    from bnn.ops import BasicInputBinarizer, XNORWeightBinarizer

    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 32, 3, padding=1),
                          nn.BatchNorm2d(32), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    bc = BConfig(activation_pre_process=BasicInputBinarizer, activation_post_process=Identity,
                 weight_pre_process=XNORWeightBinarizer.with_args(compute_alpha=compute_alpha,
                                                                  center_weights=center_weights))
    # bnn's special word for the first layer is '_last_' (its two special words are swapped in 0.1.2)
    return prepare_binary_model(model, bc, ignore_layers_name=["_last_"])


def brevitas_binary_per_channel():
    """A brevitas binary weight quantizer scaled per output channel by mean |w| (XNOR-Net's α), clamp not in place."""
    from brevitas.core.function_wrapper import TensorClamp
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant import SignedBinaryWeightPerTensorConst

    class SignedBinaryWeightPerChannelMean(SignedBinaryWeightPerTensorConst):
        scaling_impl_type = ScalingImplType.STATS
        scaling_stats_op = "AVE"
        scaling_per_output_channel = True
        tensor_clamp_impl = TensorClamp

    return SignedBinaryWeightPerChannelMean


def brevitas_net(per_channel: bool = False) -> nn.Module:
    """Two binary QuantLinear layers: ``SignedBinaryWeightPerTensorConst`` (scale 0.1, clamps the weight in place),
    or with ``per_channel`` the quantizer of :func:`brevitas_binary_per_channel`."""
    import brevitas.nn as qnn
    from brevitas.quant import SignedBinaryActPerTensorConst, SignedBinaryWeightPerTensorConst

    wq = brevitas_binary_per_channel() if per_channel else SignedBinaryWeightPerTensorConst
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.BatchNorm1d(128),
                         qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst),
                         qnn.QuantLinear(128, 128, bias=False, weight_quant=wq),
                         nn.BatchNorm1d(128), qnn.QuantIdentity(act_quant=SignedBinaryActPerTensorConst),
                         qnn.QuantLinear(128, 10, bias=False, weight_quant=wq))


def binary_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """{parameter name: its module} for the probe's layers."""
    mods = dict(model.named_modules())
    return {n: mods[n.rsplit(".", 1)[0]] for n in names}
