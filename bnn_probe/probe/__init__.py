"""Probe hooks: ``attach(model, optimizer, logdir)`` → :class:`Probe` (docs/quantities.md defines what it records).

Example:
    >>> import bnn_probe
    >>> probe = bnn_probe.attach(model, optimizer, "runs/x")   # doctest: +SKIP
"""

from __future__ import annotations

from .binarizers import SIGN, Binarizer, Centered, FromFunction, Sign
from .probe import Probe, attach
from .schedules import Every, LogSpaced, Never, Schedule, Steps, as_schedule

__all__ = ["attach", "Probe", "Schedule", "Every", "LogSpaced", "Never", "Steps", "as_schedule", "Binarizer", "Sign",
           "Centered", "FromFunction", "SIGN"]
