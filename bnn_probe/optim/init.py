"""Initialisation for Bop: binary weights set to random ±1 (each sign with probability 1/2), seeded.

The random bits are drawn on the CPU from a ``torch.Generator`` and copied to the parameter's device, so a seed gives
the same weights on every device.

Example:
    >>> from bnn_probe.models import BinaryMLP
    >>> from bnn_probe.optim import binary_init_
    >>> model = BinaryMLP(8, [4], 2)
    >>> ws = binary_init_(model, seed=0)
    >>> sorted(ws[0].unique().tolist())
    [-1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..nn import binary_parameters

__all__ = ["binary_init_"]


@torch.no_grad()
def binary_init_(params_or_model: nn.Module | Iterable[Tensor] | Tensor, seed: int | None = None, *,
                 generator: torch.Generator | None = None) -> list[Tensor]:
    """Set binary weights to random ±1 in place and return them.

    Args:
        params_or_model: a module (its :func:`bnn_probe.nn.binary_parameters`), a tensor, or an iterable of tensors.
        seed: seed for a fresh CPU generator (ignored when ``generator`` is given).
        generator: a CPU ``torch.Generator`` to draw from. With neither, torch's default CPU generator is used (so
            ``torch.manual_seed`` governs it).
    """
    if isinstance(params_or_model, nn.Module):
        params = binary_parameters(params_or_model)
        if not params:
            raise ValueError("binary_init_: the model has no binary parameters")
    elif isinstance(params_or_model, Tensor):
        params = [params_or_model]
    else:
        params = list(params_or_model)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    for p in params:
        bits = torch.randint(0, 2, p.shape, generator=generator, device="cpu")
        p.copy_((bits * 2 - 1).to(p.dtype))
    return params
