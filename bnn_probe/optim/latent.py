"""Latent-weight baselines (BinaryConnect / BinaryNet, Courbariaux & Hubara et al. 2016), usable with any torch
optimizer.

* Clipping: after each optimizer step, w̃ ← clip(w̃, −b, b) with b = 1 (BinaryConnect). Clipping caps the inertia
  |w̃| of a latent weight (Helwegen et al. 2019, Sec. 3). :func:`clip_latent_weights` does it once;
  :class:`LatentClipper` registers it as a step post-hook and records the bound as ``optimizer.bnn_clip_value`` (the
  probe reads it; ``None`` = no clipping).
* Glorot learning-rate scaling (BinaryNet): each binary layer's learning rate is multiplied by
  1 / sqrt(1.5 / (fan_in + fan_out)), with fan_in/fan_out as ``torch.nn.init`` computes them
  (for a conv weight (out, in, k, k): fan_in = in·k², fan_out = out·k²).

Example:
    >>> import torch
    >>> from bnn_probe.models import BinaryMLP
    >>> from bnn_probe.optim import LatentClipper, glorot_param_groups
    >>> model = BinaryMLP(64, [32], 10)
    >>> opt = torch.optim.Adam(glorot_param_groups(model, lr=1e-3))
    >>> clipper = LatentClipper(opt)          # binary weights of `opt`, clipped to [-1, 1] after every step
    >>> opt.bnn_clip_value
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..nn import is_binary_parameter, named_binary_parameters
from ._validate import check_hparam

__all__ = ["clip_latent_weights", "LatentClipper", "glorot_lr_scale", "glorot_param_groups"]


def _check_bound(bound: float) -> float:
    bound = check_hparam("bound", bound)
    if bound == 0:
        raise ValueError("bound must be positive, got 0")
    return bound


@torch.no_grad()
def clip_latent_weights(params: Iterable[Tensor], bound: float = 1.0) -> None:
    """Clip every tensor of ``params`` in place to [−bound, bound]."""
    bound = _check_bound(bound)
    ps = [p for p in params]
    if ps:
        torch._foreach_clamp_min_(ps, -bound)
        torch._foreach_clamp_max_(ps, bound)


class LatentClipper:
    """Clip latent weights to [−bound, bound] after every ``optimizer.step()`` (a step post-hook).

    Args:
        optimizer: any torch optimizer (including :class:`~bnn_probe.optim.CaseOptimizer`).
        params: the latent weights to clip; default: the optimizer's parameters that are binary
            (:func:`bnn_probe.nn.is_binary_parameter`).
        bound: b > 0 (BinaryConnect: 1).

    Sets ``optimizer.bnn_clip_value = bound``; :meth:`remove` undoes both.
    """

    def __init__(self, optimizer: Optimizer, params: Iterable[Tensor] | None = None, bound: float = 1.0) -> None:
        self.bound = _check_bound(bound)
        if params is None:
            params = [p for g in optimizer.param_groups for p in g["params"] if is_binary_parameter(p)]
        self.params = list(params)
        if not self.params:
            raise ValueError("LatentClipper: no parameters to clip (the optimizer has no binary parameters; pass "
                             "params= explicitly)")
        self.optimizer = optimizer
        self._handle = optimizer.register_step_post_hook(self._hook)
        optimizer.bnn_clip_value = self.bound  # type: ignore[attr-defined]

    def _hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        clip_latent_weights(self.params, self.bound)

    def remove(self) -> None:
        self._handle.remove()
        self.optimizer.bnn_clip_value = None  # type: ignore[attr-defined]


def glorot_lr_scale(param: Tensor) -> float:
    """BinaryNet's per-layer learning-rate multiplier 1 / sqrt(1.5 / (fan_in + fan_out))."""
    if param.dim() < 2:
        raise ValueError(f"Glorot scaling needs a weight with at least 2 dimensions, got shape {tuple(param.shape)}")
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(param)
    return 1.0 / math.sqrt(1.5 / (fan_in + fan_out))


def glorot_param_groups(model: nn.Module | Iterable[tuple[str, Tensor]], lr: float, *,
                        binary: Callable[[str, Tensor], bool] | None = None,
                        include_rest: bool = True) -> list[dict[str, Any]]:
    """Param groups for any torch optimizer: one group per binary weight with ``lr · glorot_lr_scale(w)``, then (if
    ``include_rest``) one group with every other parameter at ``lr``.

    Args:
        model: a module (binary weights found by :func:`bnn_probe.nn.named_binary_parameters`) or
            ``(name, parameter)`` pairs (binary ones chosen by ``binary``, default :func:`is_binary_parameter`).
        lr: the base learning rate.
        binary: predicate ``(name, param) -> bool`` overriding how binary weights are recognised.

    Each group carries ``"name"`` (the parameter's name, or ``"real-valued"``) and ``"lr_scale"``.
    """
    lr = check_hparam("lr", lr)
    if isinstance(model, nn.Module):
        named = list(model.named_parameters())
        found = {id(p) for _, p in named_binary_parameters(model)}
        is_bin = binary or (lambda n, p: id(p) in found)
    else:
        named = list(model)
        is_bin = binary or (lambda n, p: is_binary_parameter(p))
    groups: list[dict[str, Any]] = []
    rest: list[Tensor] = []
    for name, p in named:
        if not p.requires_grad:
            continue
        if is_bin(name, p):
            scale = glorot_lr_scale(p)
            groups.append({"params": [p], "lr": lr * scale, "lr_scale": scale, "name": name})
        else:
            rest.append(p)
    if not groups:
        raise ValueError("glorot_param_groups: no binary parameters found")
    if include_rest and rest:
        groups.append({"params": rest, "lr": lr, "lr_scale": 1.0, "name": "real-valued"})
    return groups
