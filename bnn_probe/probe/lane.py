"""The probe's every-step path for the usual model: one Bop-family group measured by the compiled pass.

When every binary layer sits in one group (one device, family and dtype) measured by the compiled CPU pass
(probe/onepass.py), the per-step work around the optimizer is small: point the pass at the next rows of the
recorder's buffers before the step, and after it take those rows, with the step number, its wall-clock time and
the hyperparameters. :class:`Lane` does exactly that with as few Python calls as possible — each Python call in a
step hook costs several microseconds once the training step has evicted the interpreter's caches
(benchmarks/RESULTS.md). Steps that log histograms or snapshots, steps the pass did not measure inside the optimizer
and rows that do not fit the buffers go through the probe's general path (``Probe._measure``), which writes the same
rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .onepass import OnePass
    from .recorder import Recorder


class Lane:
    """Routes one group's compiled pass (``OnePass``) into the recorder's buffers and commits its rows.

    ``pre(t, ...)`` before the optimizer step t: the addresses of the next free row of each table due at t go into
    the pass's plan (its own buffers where a table is not due or its buffer has no row to give), then the pass is
    armed (``OnePass.pre``). ``post(t, ...)`` after the step: the rows the pass wrote are taken as step t's; False
    when the step needs the general path instead (nothing has been taken then)."""

    def __init__(self, op: OnePass, rec: Recorder) -> None:
        self.op = op
        self.rec = rec
        self.layouts = op.layouts()
        self.buffers = (rec.buffer("steps"), rec.buffer("events"), rec.buffer("tracked"))
        self.routed: tuple[int, bool, bool, bool] = (-1, False, False, False)  # step t, and which rows are in place

    def pre(self, t: int, log: bool, events: bool, tracked: bool, quant: bool) -> None:
        """Route and arm step ``t`` (``events``: flip events due and the probe samples any); ``routed`` then says
        which of its rows the pass writes in place (``Probe._measure`` reads it on the steps the lane leaves to
        it)."""
        op, P = self.op, self.op.plan
        lay_s, lay_e, lay_t = self.layouts
        b_s, b_e, b_t = self.buffers
        r = b_s.reserve(lay_s) if log else None
        e = b_e.reserve(lay_e) if events else None
        k = b_t.reserve(lay_t) if tracked else None
        P.rows_i, P.rows_f = (r[0], r[1]) if r else op._own_rows
        P.ev_i, P.ev_f = e or op._own_events
        P.tr_sign, P.tr_out = k or op._own_tracked
        self.routed = (t, r is not None, e is not None, k is not None)
        op.pre(t, quant, int(events) | int(tracked) << 1)

    def post(self, t: int, log: bool, events: bool, tracked: bool, quant: bool,
             hyper: Callable[[], np.ndarray]) -> bool:
        """Take step ``t``'s rows (``hyper()``: [L, 4] γ, τ, lr, σ for the steps row). Only for a step measured
        inside the optimizer whose due rows were all written in place; False otherwise, with nothing taken."""
        op = self.op
        rt, in_rows, in_events, in_tracked = self.routed
        if rt != t or not op.served or (log and not in_rows) or (events and not in_events) or \
                (tracked and not in_tracked):
            return False
        op.post(t, events, tracked, log and quant)  # the tail the pass did not gather (usually nothing)
        if log:
            op.steps(quant)
        self.rec.commit_step(t, hyper() if log else None, events, tracked)
        return True
