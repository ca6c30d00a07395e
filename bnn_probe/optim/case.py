"""One optimizer object for a whole BNN (larq's ``CaseOptimizer`` idea): binary weights to Bop (or any optimizer),
the real-valued rest (batch norm, biases) to Adam, behind one ``torch.optim.Optimizer``.

:class:`CaseOptimizer` wraps already-built optimizers that own disjoint parameters. ``step()`` steps every child;
``param_groups`` and ``state`` are live views of the children's (so LR schedulers, ``zero_grad``, step hooks and the
probe work on the wrapper); ``state_dict()`` is ``{"optimizers": [child.state_dict(), …]}``.
:meth:`CaseOptimizer.from_model` splits a model's parameters by predicates (larq-style), and :func:`bnn_optimizer`
builds the paper's setting (Bop for binary weights, Adam 1e-2 for the rest) in one call.

An LR scheduler on the wrapper drives every group: Bop's γ (``lr`` is its alias) and Adam's lr alike, as in the paper
(both decayed ×0.1 every 100 epochs).

Example:
    >>> import torch
    >>> from bnn_probe.models import BinaryMLP
    >>> from bnn_probe.optim import bnn_optimizer, binary_init_
    >>> model = BinaryMLP(8, [16], 2)
    >>> _ = binary_init_(model, seed=0)
    >>> opt = bnn_optimizer(model, gamma=1e-3, threshold=1e-6, lr_real=1e-2)
    >>> [type(o).__name__ for o in opt.optimizers]
    ['Bop', 'Adam']
    >>> model(torch.randn(4, 8)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..nn import named_binary_parameters

__all__ = ["CaseOptimizer", "bnn_optimizer"]

Predicate = Callable[[str, Tensor], bool] | Iterable[Tensor]
Factory = Callable[[list[Tensor]], Optimizer]


class _CaseState(MutableMapping):
    """``state`` of a CaseOptimizer: each parameter's entry lives in the state of the child that owns it."""

    def __init__(self, case: CaseOptimizer) -> None:
        self._case = case

    def _owner(self, p: Tensor) -> Optimizer:
        opt = self._case._owner_of(p)
        if opt is None:
            raise KeyError(p)
        return opt

    def __getitem__(self, p: Tensor) -> Any:
        return self._owner(p).state[p]

    def __setitem__(self, p: Tensor, value: Any) -> None:
        self._owner(p).state[p] = value

    def __delitem__(self, p: Tensor) -> None:
        del self._owner(p).state[p]

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._case.optimizers:
            yield from list(opt.state.keys())

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._case.optimizers)

    def __contains__(self, p: object) -> bool:
        return any(p in opt.state for opt in self._case.optimizers)


class CaseOptimizer(Optimizer):
    """Several optimizers over disjoint parameters, stepped together.

    Args:
        *optimizers: built optimizers, e.g. ``Bop(binary_parameters(model))`` and ``Adam(other_params, lr=1e-2)``.

    Raises ``ValueError`` when there is no optimizer, an optimizer has an empty param group, or a parameter is
    claimed by two optimizers. ``.optimizers`` lists the children; ``bnn_family`` is the first child's family that
    has one (``"bop"``, ``"bop2nd"``), else ``"latent"``.
    """

    def __init__(self, *optimizers: Optimizer) -> None:
        if not optimizers:
            raise ValueError("CaseOptimizer needs at least one optimizer")
        owner: dict[int, int] = {}
        for k, opt in enumerate(optimizers):
            if not isinstance(opt, Optimizer):
                raise ValueError(f"CaseOptimizer: argument {k} is a {type(opt).__name__}, not a torch.optim.Optimizer")
            for gi, group in enumerate(opt.param_groups):
                if len(group["params"]) == 0:
                    raise ValueError(f"CaseOptimizer: optimizer {k} ({type(opt).__name__}) has an empty param group "
                                     f"{gi}")
                for p in group["params"]:
                    if id(p) in owner and owner[id(p)] != k:
                        j = owner[id(p)]
                        raise ValueError(f"CaseOptimizer: a parameter of shape {tuple(p.shape)} is claimed twice, by "
                                         f"optimizer {j} ({type(optimizers[j]).__name__}) and optimizer {k} "
                                         f"({type(opt).__name__})")
                    owner[id(p)] = k
        self.optimizers: list[Optimizer] = list(optimizers)
        self._ready = False
        super().__init__([g for o in self.optimizers for g in o.param_groups], defaults={})
        self._ready = True

    # live views of the children ------------------------------------------------------------------------------------
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @param_groups.setter
    def param_groups(self, value: Any) -> None:
        if getattr(self, "_ready", True):
            raise AttributeError("CaseOptimizer.param_groups is a view of its optimizers' param groups; change those")

    @property  # type: ignore[override]
    def state(self) -> _CaseState:
        return _CaseState(self)

    @state.setter
    def state(self, value: Any) -> None:
        if getattr(self, "_ready", True):
            raise AttributeError("CaseOptimizer.state is a view of its optimizers' states")

    @property
    def bnn_family(self) -> str:
        for opt in self.optimizers:
            family = getattr(opt, "bnn_family", None)
            if family is not None:
                return family
        return "latent"

    def _owner_of(self, p: Tensor) -> Optimizer | None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                if any(q is p for q in group["params"]):
                    return opt
        return None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_ready", False):
            return  # Optimizer.__init__ registering the children's groups: they are already visible
        raise ValueError("CaseOptimizer.add_param_group: add the group to one of .optimizers instead (it then shows "
                         "in this optimizer's param_groups)")

    # stepping and state ----------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Step every child optimizer (``closure`` is evaluated once, before the children step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        sds = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(sds, list) or len(sds) != len(self.optimizers):
            have = len(sds) if isinstance(sds, list) else "no"
            raise ValueError(f"CaseOptimizer.load_state_dict: expected a state dict with {len(self.optimizers)} "
                             f"optimizer states under 'optimizers', got {have}")
        for opt, sd in zip(self.optimizers, sds, strict=True):
            opt.load_state_dict(sd)

    def __getstate__(self) -> dict[str, Any]:  # type: ignore[override]
        return dict(self.__dict__)

    def __repr__(self) -> str:
        inner = "\n".join("  " + repr(o).replace("\n", "\n  ") for o in self.optimizers)
        return f"{type(self).__name__}(\n{inner}\n)"

    # builders --------------------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, *cases: tuple[Predicate, Factory],
                   default: Factory | None = None) -> CaseOptimizer:
        """Split ``model``'s trainable parameters among optimizers, larq-style.

        Each case is ``(predicate, factory)``: ``predicate(name, param) -> bool`` (or a collection of parameters)
        claims parameters, ``factory(params) -> Optimizer`` builds the optimizer for them (e.g.
        ``functools.partial(Bop, gamma=1e-4)``). Unclaimed parameters go to ``default`` (skipped if none are left).
        Raises ``ValueError`` naming the parameter when two cases claim it, when a case claims nothing, or when
        parameters are left over without a default.
        """
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        claims: list[list[str]] = []
        for k, (pred, _) in enumerate(cases):
            if callable(pred):
                chosen = [n for n, p in named if pred(n, p)]
            else:
                ids = {id(p) for p in pred}
                chosen = [n for n, p in named if id(p) in ids]
            if not chosen:
                raise ValueError(f"CaseOptimizer.from_model: case {k} claims no parameters")
            claims.append(chosen)
        by_name = dict(named)
        owner: dict[str, int] = {}
        for k, chosen in enumerate(claims):
            for n in chosen:
                if n in owner:
                    raise ValueError(f"CaseOptimizer.from_model: parameter {n!r} is claimed twice, by case "
                                     f"{owner[n]} and case {k}")
                owner[n] = k
        optimizers = [factory([by_name[n] for n in chosen]) for (_, factory), chosen in zip(cases, claims, strict=True)]
        rest = [p for n, p in named if n not in owner]
        if rest:
            if default is None:
                left = [n for n, _ in named if n not in owner]
                raise ValueError(f"CaseOptimizer.from_model: no case claims {left}; add a default optimizer")
            optimizers.append(default(rest))
        return cls(*optimizers)


def bnn_optimizer(model: nn.Module, binary: str = "bop", *, gamma: float = 1e-4, threshold: float = 1e-8,
                  lr_real: float = 1e-2, real_optimizer: Callable[..., Optimizer] = torch.optim.Adam,
                  **binary_kwargs: Any) -> CaseOptimizer:
    """The paper's setting in one call: Bop (``binary="bop"``) or Bop2ndOrder (``"bop2nd"``) for
    ``binary_parameters(model)``, ``real_optimizer(rest, lr=lr_real)`` (Adam) for every other trainable parameter.
    Extra keyword arguments go to the binary optimizer (e.g. ``sigma=``, ``fused=True``)."""
    from .bop import Bop
    from .bop2nd import Bop2ndOrder

    classes = {"bop": Bop, "bop2nd": Bop2ndOrder}
    if binary not in classes:
        raise ValueError(f"unknown binary optimizer {binary!r}: choose one of {', '.join(classes)}")
    found = {id(p) for _, p in named_binary_parameters(model)}
    if not found:
        raise ValueError("bnn_optimizer: the model has no binary parameters")
    return CaseOptimizer.from_model(
        model,
        (lambda n, p: id(p) in found,
         lambda ps: classes[binary](ps, gamma=gamma, threshold=threshold, **binary_kwargs)),
        default=lambda ps: real_optimizer(ps, lr=lr_real),
    )
