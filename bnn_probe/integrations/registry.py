"""Adapters that find a BNN library's binary layers and their binarizers, for ``attach(..., binary=None)``.

An adapter is a function ``find(model) -> list[(module, parameter, binarizer)]``: the binary weights of the library's
layers in ``model`` and the :class:`~bnn_probe.probe.binarizers.Binarizer` that reproduces the sign the library's
forward pass uses. It is registered under the library's top-level package name and runs only when that package is
already imported (a model built with the library has imported it), so ``attach`` never imports a library itself.

Built in: ``bitorch`` (:mod:`.bitorch`), ``bnn`` (:mod:`.bnn`), ``brevitas`` (:mod:`.brevitas`). Another library::

    from bnn_probe.integrations import register_adapter
    from bnn_probe.probe.binarizers import Sign

    def find(model):
        return [(m, m.weight, Sign(zero=-1)) for m in model.modules() if isinstance(m, mylib.BinaryConv2d)]

    register_adapter("mylib", find)

(docs/integrations.md has the full recipe and how to check it.)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

from torch import nn

from ..probe.binarizers import Binarizer

__all__ = ["register_adapter", "find_binary_layers", "ADAPTERS"]

Found = list[tuple[nn.Module, nn.Parameter, Binarizer]]
Adapter = Callable[[nn.Module], Found]

#: library (top-level package) → adapter, or "module:function" of a built-in adapter (imported when needed)
ADAPTERS: dict[str, Adapter | str] = {
    "bitorch": "bnn_probe.integrations.bitorch:find",
    "bnn": "bnn_probe.integrations.bnn:find",
    "brevitas": "bnn_probe.integrations.brevitas:find",
}


def register_adapter(library: str, find: Adapter) -> None:
    """Use ``find(model)`` for the layers of ``library`` (its top-level package name) when ``binary=None``."""
    ADAPTERS[library] = find


def _load(spec: Adapter | str) -> Adapter:
    if callable(spec):
        return spec
    mod, fn = spec.split(":")
    return getattr(importlib.import_module(mod), fn)


def find_binary_layers(model: nn.Module) -> dict[int, tuple[str, Binarizer]]:
    """``id(parameter) → (library, binarizer)`` for every binary layer an adapter recognises in ``model``
    (libraries not imported, or whose modules the adapter cannot import, are skipped; the first adapter to claim a
    parameter wins)."""
    out: dict[int, tuple[str, Binarizer]] = {}
    for lib, spec in list(ADAPTERS.items()):
        if lib not in sys.modules:
            continue
        try:
            found = _load(spec)(model)
        except ImportError:  # another package of that name, or a version whose layout the adapter does not know
            continue
        for _module, p, b in found:
            out.setdefault(id(p), (lib, b))
    return out
