"""Tracking schedules: which optimizer steps a quantity is measured at (steps are numbered from 1).

A schedule is a callable ``schedule(step) -> bool``. Cadence options of :func:`bnn_probe.attach` accept an ``int``
``n`` (every n-th step: steps n, 2n, 3n, …; ``0`` or ``None`` means never), or any schedule object.

Example:
    >>> [s for s in range(1, 40) if Every(10)(s)]
    [10, 20, 30]
    >>> [s for s in range(1, 120) if LogSpaced(per_decade=2)(s)]
    [1, 3, 10, 32, 100]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Schedule", "Every", "LogSpaced", "Never", "Steps", "as_schedule"]


class Schedule:
    """Base class: ``__call__(step) -> bool`` and ``to_dict()`` (stored in ``meta.json``).

    ``pure``: the answer depends on the step only, so the probe may ask it ahead of time. True for the built-in
    schedules; False by default, so a subclass or a wrapped user function is asked at its step only, once (a
    subclass whose answer depends on the step alone may set ``pure = True``)."""

    pure = False

    def __call__(self, step: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": type(self).__name__}


class Every(Schedule):
    """Every ``n``-th step: fires at steps n, 2n, 3n, … (``Every(1)``: every step)."""

    pure = True

    def __init__(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"Every(n) needs n >= 1, got {n}")
        self.n = int(n)

    def __call__(self, step: int) -> bool:
        return step % self.n == 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "every", "n": self.n}

    def __repr__(self) -> str:
        return f"Every({self.n})"


class Never(Schedule):
    """Never fires (turns a quantity off)."""

    pure = True

    def __call__(self, step: int) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "never"}

    def __repr__(self) -> str:
        return "Never()"


class LogSpaced(Schedule):
    """Log-spaced steps: ``round(10 ** (k / per_decade))`` for k = 0, 1, …, deduplicated, plus (optionally) every
    ``max_gap`` steps once the log-spaced gaps grow larger than that.

    Dense early in training, sparse later; ``LogSpaced(4)`` fires at 1, 2, 3, 6, 10, 18, 32, 56, 100, …
    """

    pure = True

    def __init__(self, per_decade: int = 10, max_gap: int | None = None) -> None:
        if per_decade < 1:
            raise ValueError(f"LogSpaced needs per_decade >= 1, got {per_decade}")
        self.per_decade = int(per_decade)
        self.max_gap = int(max_gap) if max_gap else None
        self._cache: set[int] = set()
        self._k = 0
        self._upto = 0

    def __call__(self, step: int) -> bool:
        if step < 1:
            return False
        if self.max_gap and step % self.max_gap == 0:
            return True
        while self._upto < step:
            self._upto = max(1, round(10 ** (self._k / self.per_decade)))
            self._cache.add(self._upto)
            self._k += 1
        return step in self._cache

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "log_spaced", "per_decade": self.per_decade, "max_gap": self.max_gap}

    def __repr__(self) -> str:
        return f"LogSpaced({self.per_decade}, max_gap={self.max_gap})"


class Steps(Schedule):
    """An explicit set of steps."""

    pure = True

    def __init__(self, steps) -> None:
        self.steps = frozenset(int(s) for s in steps)

    def __call__(self, step: int) -> bool:
        return step in self.steps

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "steps", "steps": sorted(self.steps)}


class _Callable(Schedule):
    def __init__(self, fn: Callable[[int], bool]) -> None:
        self.fn = fn

    def __call__(self, step: int) -> bool:
        return bool(self.fn(step))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "callable", "repr": repr(self.fn)}


def as_schedule(x: int | Schedule | Callable[[int], bool] | None) -> Schedule:
    """``int n`` → :class:`Every` (0/None → :class:`Never`); a schedule or callable is used as it is."""
    if x is None or x is False:
        return Never()
    if isinstance(x, Schedule):
        return x
    if isinstance(x, bool):
        return Every(1)
    if isinstance(x, int):
        return Never() if x <= 0 else Every(x)
    if callable(x):
        return _Callable(x)
    raise TypeError(f"a cadence must be an int (every n steps), a schedule or a callable, got {x!r}")
