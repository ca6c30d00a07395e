"""Integrations with training frameworks and BNN libraries.

* ``bnn_probe.integrations.lightning.ProbeCallback`` needs the optional extra ``pip install bnn-probe[lightning]``.
* Adapters for bitorch, bnn and brevitas (``pip install bnn-probe[interop]``): with ``attach(..., binary=None)`` the
  probe finds their binary layers and the binarizer their forward pass uses (:mod:`.registry`, docs/integrations.md).
  :func:`register_adapter` adds another library.

Importing this package imports no framework or library.
"""

from __future__ import annotations

from .registry import find_binary_layers, register_adapter

__all__ = ["find_binary_layers", "register_adapter"]
