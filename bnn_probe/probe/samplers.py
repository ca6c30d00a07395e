"""Sampled per-weight records: tracked weights (a fixed sample) and flip events (a sample of the flipped weights).

Both produce fixed-size device tensors per step (no ``nonzero``, no host synchronisation); invalid slots carry
index −1 and are dropped on the host.

Flip-event sampling (uniform, without a host round trip): with f flips in the layer and c = cumsum(flipped), the
j-th of E slots takes rank r_j = j + 1 if f ≤ E, else r_j = ⌊(j + u_j)·f/E⌋ + 1 with u_j ~ U[0, 1) (stratified),
and the weight whose running count first reaches r_j (``searchsorted(c, r_j)``). Duplicate picks are dropped.

Example:
    >>> import torch
    >>> fl = torch.tensor([False, True, False, True, True])
    >>> sample_flipped(fl, 8, torch.Generator().manual_seed(0))[0].tolist()
    [1, 3, 4, -1, -1, -1, -1, -1]
"""

from __future__ import annotations

import torch
from torch import Tensor

from .context import StepContext

__all__ = ["Tracked", "FlipEvents", "sample_flipped"]


def sample_flipped(flipped: Tensor, e: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(indices, valid) of up to ``e`` flipped positions, uniformly stratified; invalid slots have index −1."""
    dev = flipped.device
    c = torch.cumsum(flipped, 0, dtype=torch.int64)
    f = c[-1]
    j = torch.arange(e, device=dev, dtype=torch.float64)
    u = torch.rand(e, generator=gen, device=dev, dtype=torch.float64)
    ranks = torch.where(f <= e, j + 1, torch.floor((j + u) * f / e) + 1).to(torch.int64)
    valid = ranks <= f
    idx = torch.searchsorted(c, ranks).clamp_max(flipped.numel() - 1)
    return torch.where(valid, idx, -1), valid


class Tracked:
    """A fixed random sample of weights per layer (chosen at attach): sign (±1), inertia after the step
    (latent |w̃_t|; Bop family τ − w_t·m_t) and step size (latent |w̃_t − w̃_{t−1}|; Bop family |m_t − m_{t−1}|).
    Returns (sign int64 [T], inertia float64 [T], step_size float64 [T])."""

    name = "tracked"

    def compute(self, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor]:
        idx = ctx.state.t_idx
        s = torch.where(ctx.sign[idx], 1, -1)
        return s, ctx.inertia_at(idx), ctx.step_size_at(idx)


class FlipEvents:
    """Up to ``e`` sampled weights that flipped at this step: index, inertia just before the step
    (latent |w̃_{t−1}|; Bop family τ − w_{t−1}·m_{t−1}), steps since its previous flip (−1: first flip since attach)
    and the step size at the flip (as :class:`Tracked`). Must run before the counters are updated.
    Returns (int64 [e, 2] = (index, since), float64 [e] inertia, float64 [e] step_size)."""

    name = "events"

    def __init__(self, e: int, gen: torch.Generator) -> None:
        self.e = int(e)
        self.gen = gen

    def compute(self, ctx: StepContext) -> tuple[Tensor, Tensor, Tensor]:
        idx, valid = sample_flipped(ctx.flipped, self.e, self.gen)
        safe = idx.clamp_min(0)
        last = ctx.state.last[safe].to(torch.int64)
        since = torch.where(last > 0, ctx.step - last, -1)
        inertia = ctx.inertia_before_at(safe)
        step = ctx.step_size_at(safe)
        nan = float("nan")
        return torch.stack([idx, since], 1), torch.where(valid, inertia, nan), torch.where(valid, step, nan)
