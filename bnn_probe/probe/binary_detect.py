"""Which parameters are binary, which optimizer (and param group) steps them, and which family it is.

Families: ``"bop"`` (:class:`bnn_probe.optim.Bop`), ``"bop2nd"`` (Bop2ndOrder) — read from the optimizer's class
attribute ``bnn_family`` — and ``"latent"`` (any other torch optimizer: the binary weight is sign(w̃)).

Example:
    >>> import torch
    >>> from bnn_probe.models import BinaryMLP
    >>> model = BinaryMLP(8, [4], 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> [l.name for l in resolve_layers(model, opt, None)]
    ['fc1.weight', 'fc2.weight']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import BnnProbeError
from ..nn import named_binary_parameters

__all__ = ["LayerInfo", "resolve_layers", "leaf_optimizers", "family_of", "clip_value_of"]

BinarySpec = Sequence[str] | Callable[[str, nn.Parameter], bool] | None


@dataclass
class LayerInfo:
    """One binary parameter ("layer") and what steps it."""

    index: int
    name: str
    param: nn.Parameter
    module_type: str
    optimizer: torch.optim.Optimizer  # the leaf optimizer holding the parameter
    group_index: int  # index of the param group in the probed optimizer (flattened over a CaseOptimizer)
    family: str
    clip_value: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.param.numel()

    @property
    def group(self) -> dict[str, Any]:
        return self.optimizer.param_groups[self.extra["leaf_group"]]

    @property
    def shape(self) -> str:
        return "x".join(str(d) for d in self.param.shape)

    @property
    def fans(self) -> tuple[int, int]:
        if self.param.dim() < 2:
            return (self.param.numel(), self.param.numel())
        return nn.init._calculate_fan_in_and_fan_out(self.param)


def leaf_optimizers(optimizer: torch.optim.Optimizer) -> list[torch.optim.Optimizer]:
    """The optimizers that actually hold parameters (a CaseOptimizer's ``.optimizers``, or the optimizer itself)."""
    subs = getattr(optimizer, "optimizers", None)
    if subs:
        out: list[torch.optim.Optimizer] = []
        for o in subs:
            out.extend(leaf_optimizers(o))
        return out
    return [optimizer]


def family_of(optimizer: torch.optim.Optimizer) -> str:
    fam = getattr(optimizer, "bnn_family", None)
    return fam if fam in ("bop", "bop2nd") else "latent"


def clip_value_of(probed: torch.optim.Optimizer, leaf: torch.optim.Optimizer) -> float | None:
    for o in (leaf, probed):
        v = getattr(o, "bnn_clip_value", None)
        if v is not None:
            return float(v)
    return None


def _module_types(model: nn.Module) -> dict[str, str]:
    out = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            out.setdefault(f"{mname}.{pname}" if mname else pname, type(mod).__name__)
    return out


def resolve_layers(model: nn.Module, optimizer: torch.optim.Optimizer, binary: BinarySpec) -> list[LayerInfo]:
    """The binary parameters of ``model`` in ``named_parameters()`` order, each with its optimizer and family.

    ``binary``: a list of parameter names, a predicate ``(name, param) -> bool``, or ``None`` (bnn_probe's binary
    layers and parameters marked binary, plus every parameter of a Bop-family optimizer).
    """
    named = list(model.named_parameters())
    by_name = dict(named)
    if binary is None:
        chosen = {id(p) for _, p in named_binary_parameters(model)}
        for leaf in leaf_optimizers(optimizer):
            if family_of(leaf) != "latent":
                chosen.update(id(p) for g in leaf.param_groups for p in g["params"])
        selected = [(n, p) for n, p in named if id(p) in chosen]
        if not selected:
            raise BnnProbeError(
                "no binary parameters found: the model has no bnn_probe binary layers and the optimizer is not "
                "Bop-family; name them with attach(..., binary=['layer.weight', ...]) or a predicate")
    elif callable(binary):
        selected = [(n, p) for n, p in named if binary(n, p)]
        if not selected:
            raise BnnProbeError("the binary= predicate selected no parameter of the model")
    else:
        names = [binary] if isinstance(binary, str) else list(binary)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise BnnProbeError(f"binary= names not in model.named_parameters(): {', '.join(missing)}")
        if not names:
            raise BnnProbeError("binary= is an empty list: name at least one binary parameter")
        wanted = set(names)
        selected = [(n, p) for n, p in named if n in wanted]

    where: dict[int, tuple[torch.optim.Optimizer, int, int]] = {}
    gi = 0
    for leaf in leaf_optimizers(optimizer):
        for li, g in enumerate(leaf.param_groups):
            for p in g["params"]:
                where.setdefault(id(p), (leaf, li, gi))
            gi += 1
    not_stepped = [n for n, p in selected if id(p) not in where]
    if not_stepped:
        raise BnnProbeError(
            f"binary parameter(s) not stepped by the given {type(optimizer).__name__}: {', '.join(not_stepped)}; "
            "attach the probe to the optimizer that steps the binary weights")
    types = _module_types(model)
    layers = []
    for i, (n, p) in enumerate(selected):
        leaf, li, gi = where[id(p)]
        layers.append(LayerInfo(index=i, name=n, param=p, module_type=types.get(n, ""), optimizer=leaf,
                                group_index=gi, family=family_of(leaf), clip_value=clip_value_of(optimizer, leaf),
                                extra={"leaf_group": li}))
    return layers
