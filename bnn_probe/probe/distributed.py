"""The probe under ``torch.distributed`` (DDP, torchrun): rank helpers and the cross-rank sign-hash check.

Only global rank 0 writes the run log; the other ranks keep the probe's step counter and run its callbacks, nothing
else, so the every-step path adds no collective. Under DDP every rank must hold the same binary weights (they see the
same averaged gradient and step the same optimizer). :class:`RankCheck` verifies that on a sparse ("heavier")
schedule: each rank hashes the sign bits of every binary layer (the ``sign_hash`` of docs/quantities.md,
``Σ_{i: w_i ≥ 0} r_i``), the hashes are gathered with one ``all_gather`` of an int64 vector, and rank 0 logs

* ``rank_divergence`` in the ``train`` table at every check: the number of binary layers whose hash is not the same
  on every rank (0 = all ranks agree);
* a :class:`RankDivergenceWarning` naming the step, the layers and the ranks that differ from rank 0.

``attach`` installs the check by itself when ``torch.distributed`` is initialised with more than one process
(:func:`install_rank_check`), on the probe's ``hist_every`` schedule.

Example:
    >>> rank_world()
    (0, 1)
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from .context import hash_coefficients

__all__ = ["rank_world", "is_rank_zero", "rank_zero_only", "layer_sign_hashes", "RankCheck",
           "RankDivergenceWarning", "install_rank_check"]

F = TypeVar("F", bound=Callable[..., Any])


class RankDivergenceWarning(UserWarning):
    """Ranks of a distributed run hold different binary weights."""


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    """``(global rank, world size)`` from ``torch.distributed`` when initialised, else from torchrun's ``RANK`` /
    ``WORLD_SIZE`` environment variables, else ``(0, 1)``."""
    if _dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    """True on global rank 0 (and in a process that is not distributed)."""
    return rank_world()[0] == 0


def rank_zero_only(fn: F) -> F:
    """Decorator: run ``fn`` on global rank 0 only; other ranks get ``None`` (no collective is involved)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_rank_zero() else None

    return wrapper  # type: ignore[return-value]


def layer_sign_hashes(params: list[Tensor]) -> Tensor:
    """int64 vector, one ``sign_hash = Σ_{i: w_i ≥ 0} r_i`` per parameter, on the parameters' device (no sync)."""
    out = []
    for p in params:
        w = p.detach().reshape(-1)
        mix = hash_coefficients(w.numel(), w.device)
        out.append(torch.sum(mix * (w >= 0), dtype=torch.int64))
    return torch.stack(out)


class RankCheck:
    """Probe callback ``fn(probe, step)``: gather per-layer sign hashes from every rank and log disagreements.

    Runs on every rank (it is a collective: all ranks must call it at the same steps, which they do because they take
    the same optimizer steps). ``history`` keeps ``(step, diverged layer names)`` for the checks that found one.
    With the gloo backend the hashes are gathered on the CPU; with NCCL on the GPU.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.history: list[tuple[int, list[str]]] = []
        self.checks = 0

    def __call__(self, probe: Any, step: int) -> None:
        if not _dist_ready():
            return
        world = torch.distributed.get_world_size(self.group)
        if world < 2:
            return
        local = layer_sign_hashes([ly.param for ly in probe.layers])
        if torch.distributed.get_backend(self.group) == "gloo":
            local = local.cpu()
        gathered = [torch.empty_like(local) for _ in range(world)]
        torch.distributed.all_gather(gathered, local, group=self.group)
        table = torch.stack(gathered).cpu()  # [world, layers]
        self.checks += 1
        differs = (table != table[0]).any(dim=0)
        names = [ly.name for ly, d in zip(probe.layers, differs.tolist(), strict=True) if d]
        if names:
            self.history.append((step, names))
        if not probe.active:
            return
        probe.log(step=step, rank_divergence=float(len(names)))
        if names:
            bad_ranks = sorted({r for r in range(world) for li in range(table.shape[1])
                                if table[r, li] != table[0, li]})
            warnings.warn(f"step {step}: binary weights differ across ranks in {len(names)} layer(s) "
                          f"({', '.join(names[:5])}{', …' if len(names) > 5 else ''}); ranks {bad_ranks} differ "
                          "from rank 0", RankDivergenceWarning, stacklevel=2)


def install_rank_check(probe: Any, every: Any = None, group: Any = None) -> RankCheck | None:
    """Register a :class:`RankCheck` on ``probe`` (``every`` defaults to the probe's ``hist_every`` schedule).

    Does nothing (returns None) unless ``torch.distributed`` is initialised with more than one process.
    """
    if not _dist_ready() or torch.distributed.get_world_size(group) < 2:
        return None
    check = RankCheck(group)
    probe.add_callback(check, every=probe.hist_every if every is None else every)
    probe.rank_check = check
    return check
