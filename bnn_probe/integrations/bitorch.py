"""Adapter for bitorch (``pip install bitorch``; tested with 0.4.1): ``QLinear``, ``QConv1d/2d/3d``.

bitorch wraps each layer in a ``LayerContainer``; ``model.named_modules()`` shows the implementation
(``_QLinearComposed``, ``_QConv2dComposed``, subclasses of ``QLinearBase``/``QConv*dBase``), whose weight
quantization module (``weight_quantization`` on linear layers, ``_weight_quantize`` on convolutions) the forward pass
applies to ``weight``. A layer is binary when that quantization has ``bit_width == 1``. Binarizers:

* ``sign``, ``approx_sign``, ``swish_sign``: ``torch.sign`` with 0 ↦ +1 — bnn-probe's sign (the fast path);
* ``steheaviside``: ``x > 0 ? +1 : −1`` — :class:`~bnn_probe.probe.binarizers.Sign` with ``zero=-1``;
* any other 1-bit quantization (1-bit ``weightdorefa``, ``progressive_sign``, a custom one): the quantization module
  itself, called without autograd (:class:`~bnn_probe.probe.binarizers.FromFunction`; exact by construction, slower).
"""

from __future__ import annotations

from torch import nn

from ..probe.binarizers import Binarizer, FromFunction, Sign

__all__ = ["find", "binarizer_of"]

_SIGN_LIKE = ("Sign", "ApproxSign", "SwishSign")


def _layer_classes() -> tuple[type, ...]:
    from bitorch.layers.qconv1d import QConv1dBase
    from bitorch.layers.qconv2d import QConv2dBase
    from bitorch.layers.qconv3d import QConv3dBase
    from bitorch.layers.qlinear import QLinearBase

    return (QLinearBase, QConv1dBase, QConv2dBase, QConv3dBase)


def _quantization(module: nn.Module) -> nn.Module | None:
    for attr in ("weight_quantization", "_weight_quantize"):
        q = module.__dict__.get("_modules", {}).get(attr)
        if q is not None:
            return q
    return None


def binarizer_of(quant: nn.Module) -> Binarizer | None:
    """The binarizer of a bitorch weight quantization module, None when it is not 1-bit."""
    if int(getattr(quant, "bit_width", -1)) != 1:
        return None
    cls = type(quant).__name__
    if cls in _SIGN_LIKE:
        return Sign(name=f"bitorch.{quant.name}")
    if cls == "SteHeaviside":
        return Sign(zero=-1, name="bitorch.steheaviside")
    return FromFunction(quant, name=f"bitorch.{getattr(quant, 'name', cls)}", keeps_zero=True, scaled=False)


def find(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter, Binarizer]]:
    """The binary weights of bitorch's quantized layers in ``model`` with their binarizers."""
    classes = _layer_classes()
    out = []
    for m in model.modules():
        if isinstance(m, classes) and isinstance(getattr(m, "weight", None), nn.Parameter):
            q = _quantization(m)
            b = binarizer_of(q) if q is not None else None
            if b is not None:
                out.append((m, m.weight, b))
    return out
