"""Shared checks for bnn_probe's optimizers: hyperparameters, gradients, binary weights, and the ``lr``/``gamma`` alias.

LR schedulers and Bop
---------------------
torch's LR schedulers (``StepLR``, ``CosineAnnealingLR``, ``ReduceLROnPlateau``, …) read and write
``param_group["lr"]``. In Bop and Bop2ndOrder the rate that plays that role is γ (``gamma``), so every param group is a
:class:`GammaGroup`: a ``dict`` in which ``"lr"`` and ``"gamma"`` are two names of one value. Writing either key writes
both; both are always present, so a scheduler driving ``"lr"`` drives γ, and a reader of ``"gamma"`` (the probe)
sees the value in force. ``state_dict()`` stores both keys; ``load_state_dict()`` restores the alias (a saved group
whose two values disagree is refused with a ValueError).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

ALIASES: tuple[str, str] = ("gamma", "lr")


def check_hparam(name: str, value: Any, *, upper: float | None = None) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming ``name`` when it is not a finite number in
    ``[0, upper]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real | Tensor):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper}, got {value}")
    return value


class GammaGroup(dict):
    """A param group in which ``"lr"`` is an alias of ``"gamma"`` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.update(*args, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:
        if key in ALIASES:
            dict.__setitem__(self, "gamma", value)
            dict.__setitem__(self, "lr", value)
        else:
            dict.__setitem__(self, key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        items = dict(*args, **kwargs)
        if "gamma" in items and "lr" in items and _differ(items["gamma"], items["lr"]):
            raise ValueError(f"param group gives gamma={items['gamma']!r} and lr={items['lr']!r}; in Bop 'lr' is an "
                             f"alias of 'gamma' (for LR schedulers): give one of them, or equal values")
        for k, v in items.items():
            self[k] = v

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key in ALIASES:
            other = ALIASES[1 - ALIASES.index(key)]
            if key not in self:
                self[key] = dict.__getitem__(self, other) if other in self else default
            return self[key]
        return dict.setdefault(self, key, default)

    def __reduce__(self):  # pickling / deepcopy keep the alias
        return (GammaGroup, (dict(self),))


def _differ(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # tensors of several elements etc.
        return True


def param_label(group: dict, index: int, group_index: int) -> str:
    """How an error message names a parameter: its name when the optimizer was given named parameters, else its
    position and shape."""
    p = group["params"][index]
    names = group.get("param_names")
    if names is not None and index < len(names):
        return f"parameter {names[index]!r} (shape {tuple(p.shape)})"
    return f"param_groups[{group_index}]['params'][{index}] (shape {tuple(p.shape)})"


def check_grad(grad: Tensor, group: dict, index: int, group_index: int, optimizer: str) -> None:
    if grad.is_sparse:
        raise ValueError(f"{optimizer} does not support sparse gradients: {param_label(group, index, group_index)} "
                         f"has a sparse gradient")


def check_binary_values(p: Tensor, group: dict, index: int, group_index: int, optimizer: str) -> None:
    """Raise ``ValueError`` when ``p`` holds anything other than ±1 (Bop flips signs: it needs binary weights)."""
    with torch.no_grad():
        ok = bool(((p == 1) | (p == -1)).all())
    if not ok:
        bad = p.detach()[(p != 1) & (p != -1)].flatten()[:3].tolist()
        raise ValueError(f"{optimizer}(check_binary=True): {param_label(group, index, group_index)} is not binary "
                         f"(values other than ±1, e.g. {bad}); initialise it with bnn_probe.optim.binary_init_")


def check_bop_group(group: dict[str, Any], index: int | None, optimizer: str) -> tuple[str, float, float]:
    """The checks every Bop-family group shares: ``lr`` agrees with ``gamma`` (unless the group is a
    :class:`GammaGroup`, where they are one value), γ ∈ [0, 1], τ ≥ 0, not both ``foreach`` and ``fused``.
    Returns (``where``, the group's place for messages; γ; τ)."""
    where = "" if index is None else f" (param_groups[{index}])"
    if not isinstance(group, GammaGroup) and "lr" in group and group["lr"] != group["gamma"]:
        raise ValueError(f"param group{where} has lr={group['lr']!r} but gamma={group['gamma']!r}: in {optimizer} "
                         f"'lr' is an alias of 'gamma'; set one of them")
    gamma = check_hparam(f"gamma{where}", group["gamma"], upper=1.0)
    threshold = check_hparam(f"threshold{where}", group["threshold"])
    if group.get("foreach") and group.get("fused"):
        raise ValueError(f"foreach and fused cannot both be True{where}")
    return where, gamma, threshold


class GammaAliasOptimizer(Optimizer):
    """Base of the Bop family: every param group is a :class:`GammaGroup` (``"lr"`` ≡ ``"gamma"``, so LR schedulers
    drive γ), filled with the defaults and checked by the subclass's ``validate_group(group)`` when added and after
    ``load_state_dict``."""

    validate_group: Callable[..., Any]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = GammaGroup(param_group)
        for key, default in self.defaults.items():
            group.setdefault(key, default)
        type(self).validate_group(group)
        super().add_param_group(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.param_groups = [g if isinstance(g, GammaGroup) else GammaGroup(g) for g in self.param_groups]

    def _gather(self, group: dict[str, Any], group_index: int, state_keys: tuple[str, ...]
                ) -> tuple[list[Tensor], list[list[Tensor]], list[Tensor]]:
        """The group's parameters that have a gradient (checked), their state tensors under ``state_keys``
        (created as zeros at the first step, after ``check_binary``) and their gradients: (ws, [per key], gs)."""
        name = type(self).__name__
        ws: list[Tensor] = []
        states: list[list[Tensor]] = [[] for _ in state_keys]
        gs: list[Tensor] = []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            check_grad(p.grad, group, i, group_index, name)
            state = self.state[p]
            if state_keys[0] not in state:
                if group["check_binary"]:
                    check_binary_values(p, group, i, group_index, name)
                for key in state_keys:
                    state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ws.append(p)
            for out, key in zip(states, state_keys, strict=True):
                out.append(state[key])
            gs.append(p.grad)
        return ws, states, gs
