"""Adapter for brevitas (``pip install brevitas``; tested with 0.13.4): ``QuantLinear``, ``QuantConv1d/2d/3d`` and
the other weight-quantized layers, with a 1-bit weight quantizer.

A layer is binary when its weight quantization proxy (``module.weight_quant``) is enabled and has bit width 1
(``SignedBinaryWeightPerTensorConst`` or a custom binary quantizer). Binarizers:

* brevitas' ``BinaryQuant`` and ``ClampedBinaryQuant`` (the binary weight quantizers): b(w) = ``binary_sign`` = +1
  iff w ≥ 0 — bnn-probe's sign (the fast path); the scale s of the forward pass's s·b(w) (0.1 for
  ``SignedBinaryWeightPerTensorConst``) is recorded in the ``scales`` table. ``ClampedBinaryQuant`` clamps w to
  [−s, s] first, which does not change its sign;
* any other 1-bit quantizer: the proxy itself, called without autograd on a copy of the weight
  (:class:`~bnn_probe.probe.binarizers.FromFunction`: positive = [value > 0]; exact by construction, slower).
"""

from __future__ import annotations

import torch
from torch import nn

from ..probe.binarizers import Binarizer, FromFunction, Sign

__all__ = ["find", "binarizer_of"]


def _bit_width(proxy: nn.Module) -> float | None:
    try:
        if not getattr(proxy, "is_quant_enabled", False):
            return None
        bw = proxy.bit_width()
    except Exception:  # noqa: BLE001 - a proxy that cannot answer is not a binary quantizer we understand
        return None
    return None if bw is None else float(torch.as_tensor(bw).reshape(-1)[0])


def binarizer_of(module: nn.Module) -> Binarizer | None:
    """The binarizer of a brevitas layer's weight quantizer, None when it is not 1-bit."""
    from brevitas.core.quant.binary import BinaryQuant, ClampedBinaryQuant

    proxy = getattr(module, "weight_quant", None)
    if proxy is None or _bit_width(proxy) != 1.0:
        return None
    tq = getattr(proxy, "tensor_quant", None)

    def quant(w: torch.Tensor):
        return proxy(w.clone())  # a copy: a quantizer may clamp its input in place

    if isinstance(tq, (BinaryQuant, ClampedBinaryQuant)):
        return Sign(scale=lambda w: quant(w).scale, name=f"brevitas.{type(tq).__name__}")
    return FromFunction(quant, name=f"brevitas.{type(tq).__name__}", keeps_zero=True)


def find(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter, Binarizer]]:
    """The binary weights of brevitas' quantized layers in ``model`` with their binarizers."""
    out = []
    for m in model.modules():
        if hasattr(m, "weight_quant") and isinstance(getattr(m, "weight", None), nn.Parameter):
            b = binarizer_of(m)
            if b is not None:
                out.append((m, m.weight, b))
    return out
