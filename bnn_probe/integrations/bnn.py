"""Adapter for bnn (1adrianb's binary-networks-pytorch, ``pip install bnn``; tested with 0.1.2).

``bnn.prepare_binary_model`` swaps ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` for ``bnn.layers.Linear``/``Conv1d``/
``Conv2d`` whose forward pass applies ``weight_pre_process`` to ``weight``. A layer is binary when that is a
``bnn.ops.XNORWeightBinarizer`` (or another ``bnn.ops.BinarizerBase``); ``nn.Identity`` (a layer left real-valued by
its ``BConfig``) is not. Binarizers:

* ``XNORWeightBinarizer(center_weights=True)``: b(w) = sign(w − mean(w, dim=1)) with ``torch.sign`` (0 ↦ 0) —
  :class:`~bnn_probe.probe.binarizers.Centered` (latent inertia |w − mean(w, dim=1)|);
* ``center_weights=False``: b(w) = torch.sign(w) (0 ↦ 0);
* ``compute_alpha=True``: α = ‖w_c‖₁/n per output channel (XNOR-Net, Rastegari et al. 2016) is recorded as the layer's
  scale (``scales`` table), not mixed into b(w). With torch ≥ 2.x bnn 0.1.2's α is computed with an in-place
  division that autograd rejects in the backward pass ("modified by an inplace operation"): training with
  ``compute_alpha=True`` fails in bnn itself (docs/integrations.md);
* any other ``BinarizerBase``: the module itself, called without autograd (exact by construction).
"""

from __future__ import annotations

from torch import nn

from ..probe.binarizers import Binarizer, Centered, FromFunction

__all__ = ["find", "binarizer_of"]


def binarizer_of(pre: nn.Module) -> Binarizer | None:
    """The binarizer of a bnn ``weight_pre_process`` module, None when it does not binarize."""
    from bnn.ops import BinarizerBase, XNORWeightBinarizer

    if type(pre) is XNORWeightBinarizer:
        return Centered(dim=1 if pre.center_weights else None, zero=0, alpha=bool(pre.compute_alpha))
    if isinstance(pre, BinarizerBase):
        return FromFunction(pre, name=f"bnn.{type(pre).__name__}", keeps_zero=True)
    return None


def find(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter, Binarizer]]:
    """The binary weights of bnn's layers in ``model`` with their binarizers."""
    from bnn import layers as bl

    out = []
    for m in model.modules():
        if isinstance(m, (bl.Linear, bl.Conv1d, bl.Conv2d)) and isinstance(m.weight, nn.Parameter):
            b = binarizer_of(m.weight_pre_process)
            if b is not None:
                out.append((m, m.weight, b))
    return out
