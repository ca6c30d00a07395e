"""Integrations with training frameworks. ``bnn_probe.integrations.lightning.ProbeCallback`` needs the optional
extra ``pip install bnn-probe[lightning]``; importing this package imports no framework."""

from __future__ import annotations

__all__: list[str] = []
