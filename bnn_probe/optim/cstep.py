"""Bop's CPU step in C, and the hand-off that lets an attached probe measure inside it.

The step (``bnnp_bop_update`` in bnn_probe/probe/_pass.c, built by ``pip install`` with the probe's extension) is
Helwegen et al. (2019), Algorithm 1, in one pass per tensor (read g, m, w; write m, w), many tensors per call:

    m_t = (1 − γ) · m_{t−1} + γ · g_t      computed as fma(g_t, γ, m_{t−1} · (1 − γ)), one rounding of γ·g
    w_t = −w_{t−1}  if  w_{t−1} · m_t > τ  else  w_{t−1}

in the weights' dtype. torch's CPU ``add_(g, alpha=γ)`` computes the same fused multiply-add, so on the CPU the C
step equals the ``foreach`` and loop paths bit for bit (tests/test_optim_bop.py). A gradient entry that is NaN or
±inf keeps its m (optim/nonfinite.py) and is counted exactly, so the step needs no separate norm pass.

Measured steps (:data:`MEASURE_ATTR`): an attached probe (probe/onepass.py) whose CPU group is exactly some of the
weights of a :class:`~bnn_probe.optim.Bop` leaves a request on the optimizer in its pre-step hook. The step then
either hands the request its layers' gradients and hyperparameters and the request runs the update and the whole
post-step measurement in one pass over the weights (``bnnp_bop_fused``), or, when some of the request's weights
do not take this C step (another dtype or device, ``foreach=True``, a non-contiguous tensor), declines it before any
weight moves, and the probe measures around the step as it does for any optimizer. Either way every logged value is
the same; the fused pass reads each weight once instead of three times (the probe's pre-step pass, the optimizer's
step, the probe's post-step pass).
"""

from __future__ import annotations

import ctypes
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["MEASURE_ATTR", "MeasureRequest", "bop_step_c", "kernels", "usable"]

MEASURE_ATTR = "bnn_probe_measure_requests"  # a list on the optimizer, set by the probe before each step


class MeasureRequest(Protocol):
    """What a probe leaves on the optimizer (probe/onepass.py's OnePass)."""

    param_ids: frozenset[int]

    def run(self, jobs: dict[int, tuple[Tensor, Tensor, Tensor, float, float]]) -> dict[int, int]:
        """Step and measure the request's layers: ``jobs[id(w)] = (w, m, g, γ, τ)`` for those with a gradient.
        Returns {id(w): non-finite gradient entries skipped}."""

    def decline(self) -> None:
        """The step will not measure: the probe measures around it (called before any weight moves)."""


def kernels(dtype: torch.dtype) -> Any | None:
    """The C functions for ``dtype`` (float32/float64), or None (other dtype, or the extension is not installed)."""
    from ..probe import cpu_pass

    ks = cpu_pass.load()  # (cached: the extension is loaded once per process)
    if ks is None or dtype not in _NP_FLOAT:
        return None
    return ks[_NP_FLOAT[dtype]]


_NP_FLOAT = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def usable(ws: list[Tensor], ms: list[Tensor], gs: list[Tensor]) -> bool:
    """The C step can update these tensors: dense, contiguous CPU tensors of one float32/float64 dtype each."""
    dtypes = set()
    for w, m, g in zip(ws, ms, gs, strict=True):
        dt = w.dtype
        if not (w.is_cpu and m.is_cpu and g.is_cpu and m.dtype == g.dtype == dt and g.layout == torch.strided
                and w.is_contiguous() and m.is_contiguous() and g.is_contiguous()):
            return False
        dtypes.add(dt)
    return all(kernels(dt) is not None for dt in dtypes)


def bop_step_c(ws: list[Tensor], ms: list[Tensor], gs: list[Tensor], gammas: list[float],
               thresholds: list[float]) -> list[int]:
    """One C call per dtype: the Bop step of every tensor (hyperparameters per tensor). Returns the number of
    non-finite gradient entries skipped per tensor. Bumps the tensors' version counters (autograd sees the
    in-place change). The C call's arrays are ctypes arrays: building numpy arrays for them cost more than the step
    of a small model (≈ 70 µs of Python per step on the digits MLP, against ≈ 40 µs of C)."""
    dtypes = {w.dtype for w in ws}
    if len(dtypes) == 1:  # the usual case: one call over every tensor
        (dt,) = dtypes
        out = _update(dt, ws, ms, gs, gammas, thresholds)
    else:
        out = [0] * len(ws)
        for dt in dtypes:
            rows = [i for i, w in enumerate(ws) if w.dtype == dt]
            bad = _update(dt, [ws[i] for i in rows], [ms[i] for i in rows], [gs[i] for i in rows],
                          [gammas[i] for i in rows], [thresholds[i] for i in rows])
            for i, b in zip(rows, bad, strict=True):
                out[i] = b
    torch.autograd.graph.increment_version(ws + ms)
    return out


_VP, _I64 = ctypes.c_void_p, ctypes.c_int64
_CT_FLOAT = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_data_ptr = Tensor.data_ptr


def _update(dt: torch.dtype, ws: list[Tensor], ms: list[Tensor], gs: list[Tensor], gammas: list[float],
            thresholds: list[float]) -> list[int]:
    """``bnnp_bop_update`` over tensors of one dtype; the non-finite entries skipped per tensor."""
    n = len(ws)
    hp: list[float] = []
    for gm, tau in zip(gammas, thresholds, strict=True):
        hp += (gm, 1.0 - gm, tau)
    bad = (_I64 * n)()
    kernels(dt).bop_update(n, (_VP * n)(*map(_data_ptr, ws)), (_VP * n)(*map(_data_ptr, ms)),
                           (_VP * n)(*map(_data_ptr, gs)), (_I64 * n)(*map(Tensor.numel, ws)),
                           (_CT_FLOAT[dt] * (3 * n))(*hp), bad)
    return list(bad)
