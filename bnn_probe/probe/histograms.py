"""Heavier quantities on their own schedules: fixed-bin histograms and packed sign snapshots.

Histogram bins are fixed for the whole run (``bnn_probe.runlog.schema.HIST_EDGES``): bin 0 is (−inf, e_0),
bin i is [e_{i−1}, e_i), the last bin [e_last, +inf). Counted on the device with ``torch.bucketize`` + ``bincount``.

Example:
    >>> import torch
    >>> hist_counts(torch.tensor([0.5, 1.0, 3.0]), torch.tensor([1.0, 2.0])).tolist()
    [1, 1, 1]
"""

from __future__ import annotations

import torch
from torch import Tensor

from .context import StepContext

__all__ = ["hist_counts", "Histograms", "Snapshots"]


def hist_counts(x: Tensor, edges: Tensor) -> Tensor:
    """Counts of ``x`` in the bins (−inf, e_0), [e_0, e_1), …, [e_last, inf) (int64, len(edges) + 1)."""
    b = torch.bucketize(x, edges.to(x.dtype), right=True)
    return torch.bincount(b, minlength=edges.numel() + 1)


class Histograms:
    """Per layer: Bop family ``abs_m_rel`` = |m_t|/τ, ``wm_rel`` = w_t·m_t/τ (both skipped when τ ≤ 0), ``abs_m``;
    latent ``abs_w`` = |w̃_t|. Returns {quantity: (counts int64, stats float64 [min, max, sum, sum of squares])}."""

    name = "hists"

    def __init__(self, edges: dict[str, list[float]]) -> None:
        self.edges = edges
        self._dev: dict[tuple[str, str], Tensor] = {}

    def _e(self, q: str, dev: torch.device) -> Tensor:
        key = (q, str(dev))
        if key not in self._dev:
            self._dev[key] = torch.tensor(self.edges[q], dtype=torch.float64, device=dev)
        return self._dev[key]

    def compute(self, ctx: StepContext) -> dict[str, tuple[Tensor, Tensor]]:
        xs: dict[str, Tensor] = {}
        if ctx.family == "latent":
            xs["abs_w"] = ctx.w.abs()
        else:
            tau = ctx.tau
            if tau > 0:
                xs["abs_m_rel"] = ctx.abs_m / tau
                xs["wm_rel"] = ctx.wm / tau
            xs["abs_m"] = ctx.abs_m
        out = {}
        for q, x in xs.items():
            x = x.double() if x.dtype != torch.float64 else x
            mn, mx = torch.aminmax(x)
            stats = torch.stack([mn, mx, x.sum(), (x * x).sum()])
            out[q] = (hist_counts(x, self._e(q, x.device)), stats)
        return out


class Snapshots:
    """The sign bits sign(w_t) ≥ 0 of every weight of the layer (device bool copy; packed on the host with
    ``numpy.packbits(bits, bitorder="big")``)."""

    name = "snapshots"

    def compute(self, ctx: StepContext) -> Tensor:
        return ctx.sign.clone()
