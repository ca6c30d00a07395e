"""Which parameters are binary, which optimizer (and param group) steps them, and which family it is.

Families: ``"bop"`` (:class:`bnn_probe.optim.Bop`), ``"bop2nd"`` (Bop2ndOrder) — read from the optimizer's class
attribute ``bnn_family``, or declared with ``attach(..., family="bop")`` for a third-party Bop-like optimizer — and
``"latent"`` (any other torch optimizer: the binary weight is b(w̃), the layer's binarizer applied to the latent weight).

Binary layers and their binarizers (probe/binarizers.py) come from, in this order: ``binary=`` (names or a predicate
``(name, param)`` or ``(name, param, module)``); with ``binary=None`` bnn-probe's own binary layers, the layers the
adapters of :mod:`bnn_probe.integrations` recognise (bitorch, bnn, brevitas), and every parameter of a Bop-family
optimizer. ``binarizer=`` (one, or a mapping name → binarizer) overrides the adapter's.

Example:
    >>> import torch
    >>> from bnn_probe.models import BinaryMLP
    >>> model = BinaryMLP(8, [4], 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> [l.name for l in resolve_layers(model, opt, None)]
    ['fc1.weight', 'fc2.weight']
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import BnnProbeError
from ..nn import named_binary_parameters
from .binarizers import SIGN, Binarizer, BinarizerSpec, binarizer_for

__all__ = ["LayerInfo", "resolve_layers", "leaf_optimizers", "family_of", "clip_value_of"]

BinarySpec = Sequence[str] | Callable[[str, nn.Parameter], bool] | Callable[[str, nn.Parameter, nn.Module], bool] | None
BOP_FAMILIES = ("bop", "bop2nd")


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
    binarizer: Binarizer = SIGN  # b(w): the binary weight the forward pass uses (probe/binarizers.py)
    module: nn.Module | None = None  # the module that owns the parameter
    source: str = ""  # what selected it: "binary=", "bnn_probe", an adapter's library name, or "optimizer"

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


def _owners(model: nn.Module) -> dict[str, nn.Module]:
    """Parameter name → the module that holds it directly (first one, as ``named_parameters`` deduplicates)."""
    out: dict[str, nn.Module] = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            out.setdefault(f"{mname}.{pname}" if mname else pname, mod)
    return out


def _predicate_arity(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature
        return 2
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return 3
    return 3 if sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3 else 2


def resolve_layers(model: nn.Module, optimizer: torch.optim.Optimizer, binary: BinarySpec,
                   binarizer: BinarizerSpec = None, family: str | None = None, momentum_key: str | None = None,
                   threshold_key: str | None = None, gamma_key: str | None = None) -> list[LayerInfo]:
    """The binary parameters of ``model`` in ``named_parameters()`` order, each with its optimizer, family and
    binarizer.

    ``binary``: a list of parameter names, a predicate ``(name, param) -> bool`` or ``(name, param, module) -> bool``
    (module = the module holding the parameter), or ``None`` (bnn_probe's binary layers and parameters marked binary,
    the binary layers of the libraries in :mod:`bnn_probe.integrations`, plus every parameter of a Bop-family
    optimizer). ``binarizer``: b(w) for every selected layer, or a mapping name → binarizer (default: the adapter's,
    else bnn-probe's sign). ``family="bop"``/``"bop2nd"`` declares a third-party Bop-like optimizer whose state key of
    m is ``momentum_key`` (default ``"exp_avg"``) and whose param-group keys of τ and γ are ``threshold_key`` and
    ``gamma_key`` (default ``"threshold"``, ``"gamma"``); in a CaseOptimizer it applies to the optimizers that are not
    torch.optim's own (an Adam for the batch-norm parameters stays latent).
    """
    from ..integrations.registry import find_binary_layers

    if family is not None and family not in (*BOP_FAMILIES, "latent"):
        raise BnnProbeError(f"family= must be one of bop, bop2nd, latent; got {family!r}")
    if family in (None, "latent") and any(k is not None for k in (momentum_key, threshold_key, gamma_key)):
        raise BnnProbeError("momentum_key=/threshold_key=/gamma_key= declare a Bop-like optimizer: "
                            "also pass family='bop' (or 'bop2nd')")
    named = list(model.named_parameters())
    by_name = dict(named)
    owners = _owners(model)
    adapted = find_binary_layers(model)  # id(param) -> (library, binarizer)
    sources: dict[int, str] = {}

    def declared(leaf: torch.optim.Optimizer) -> bool:  # family= is about third-party optimizers, not torch's own
        return family is not None and not type(leaf).__module__.startswith("torch.optim")

    def fam(leaf: torch.optim.Optimizer) -> str:
        return family if declared(leaf) else family_of(leaf)

    if family is not None and not any(declared(leaf) for leaf in leaf_optimizers(optimizer)):
        raise BnnProbeError(f"family={family!r} declares a third-party optimizer, but every optimizer given is "
                            "torch.optim's own; attach the probe to the optimizer (or CaseOptimizer) that holds it")

    if binary is None:
        chosen = {id(p) for _, p in named_binary_parameters(model)}
        sources.update(dict.fromkeys(chosen, "bnn_probe"))
        for pid, (lib, _) in adapted.items():
            sources.setdefault(pid, lib)
        chosen.update(adapted)
        for leaf in leaf_optimizers(optimizer):
            if fam(leaf) != "latent":
                for g in leaf.param_groups:
                    for p in g["params"]:
                        sources.setdefault(id(p), "optimizer")
                        chosen.add(id(p))
        selected = [(n, p) for n, p in named if id(p) in chosen]
        if not selected:
            raise BnnProbeError(
                "no binary parameters found: the model has no bnn_probe binary layers, no binary layer of a library "
                "with an adapter (bitorch, bnn, brevitas) and the optimizer is not Bop-family; name them with "
                "attach(..., binary=['layer.weight', ...]) or a predicate, and see docs/integrations.md")
    elif callable(binary):
        if _predicate_arity(binary) == 3:
            selected = [(n, p) for n, p in named if binary(n, p, owners.get(n))]
        else:
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
    user = binarizer_for(binarizer, [n for n, _ in selected])
    layers = []
    for i, (n, p) in enumerate(selected):
        leaf, li, gi = where[id(p)]
        f = fam(leaf)
        extra: dict[str, Any] = {"leaf_group": li}
        if f in BOP_FAMILIES:
            extra.update(momentum_key=momentum_key or "exp_avg", threshold_key=threshold_key or "threshold",
                         gamma_key=gamma_key or "gamma")
            group = leaf.param_groups[li]
            if extra["threshold_key"] not in group:
                raise BnnProbeError(
                    f"{n}: the {type(leaf).__name__} param group has no threshold key {extra['threshold_key']!r} "
                    f"(keys: {', '.join(k for k in group if k != 'params')}); attach(..., threshold_key=...) names it")
        lib = adapted.get(id(p))
        b = user.get(n) or (lib[1] if lib else SIGN)
        owner = owners.get(n)
        mtype = type(owner).__name__ if owner else ""
        if lib:  # a library's layer: qualified, bnn's Linear is not torch's
            mtype = f"{lib[0]}.{mtype}"
        layers.append(LayerInfo(index=i, name=n, param=p, module_type=mtype,
                                optimizer=leaf, group_index=gi, family=f, clip_value=clip_value_of(optimizer, leaf),
                                extra=extra, binarizer=b, module=owner,
                                source=sources.get(id(p), "binary=") if binary is None else "binary="))
    return layers
