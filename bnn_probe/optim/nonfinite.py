"""Non-finite gradient entries in Bop and Bop2ndOrder: skipped, never stored, counted.

A NaN or ±inf in g_t would enter the moving average (m_t = (1 − γ) m_{t−1} + γ g_t, Helwegen et al. 2019, Alg. 1)
and stay there for the rest of the run: w·m > τ is false for NaN, so the weight would never flip again and count as
"never flipped". Both optimizers therefore treat an entry whose gradient is not finite as having no gradient at this
step: its m (and Bop2ndOrder's v) keep their previous values, its sign is decided by the unchanged state as usual, and
the optimizer adds one to ``state[p]["nonfinite_skipped"]`` (an int, saved with the optimizer's state). Finite entries
are updated exactly as without the check (bit for bit).

Cost: one multi-tensor norm of the gradients and one host synchronisation per step and device, for all param groups
together (:func:`nonfinite_params`); the masked update runs only for the tensors that hold a non-finite entry
(benchmarks/bench_nonfinite.py measures the cost). The probe logs the same entries per step as
``nonfinite_grads`` (docs/quantities.md); ``bnn-probe summary`` and the report warn when a run has any. The check
also tells an attached probe which gradients it proved finite (``optimizer.grads_all_finite``, set at every step):
the probe's compiled pass then skips reading those gradients (their count is 0), 4 of the ~13 bytes per weight.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["FINITE_ATTR", "STATE_KEY", "nonfinite_tensors", "nonfinite_params", "skip_nonfinite"]

STATE_KEY = "nonfinite_skipped"
FINITE_ATTR = "grads_all_finite"  # set by nonfinite_params on the optimizer (see there)


def nonfinite_tensors(gs: list[Tensor]) -> list[int]:
    """Indices of the gradients that may hold a NaN or ±inf: a non-finite 2-norm (a NaN/inf entry, or finite values
    whose norm overflows; the masked update then finds no entry to skip and equals the plain one). One multi-tensor
    norm and one host synchronisation per device."""
    if not gs:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(gs):
        by_device.setdefault(g.device, []).append(i)
    bad: list[int] = []
    for rows in by_device.values():
        norms = torch._foreach_norm([gs[i] for i in rows])
        finite = torch.isfinite(torch.stack([n.float() for n in norms])).tolist()
        bad += [i for i, ok in zip(rows, finite, strict=True) if not ok]
    return sorted(bad)


def nonfinite_params(optimizer: torch.optim.Optimizer, params: list[Tensor] | None = None) -> set[int]:
    """``id`` of every parameter of ``optimizer`` (or of ``params``) whose gradient may hold a NaN or ±inf (checked
    for all param groups at once, so a step synchronises once, not once per group)."""
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    ps = [p for p in params if p.grad is not None and p.grad.layout == torch.strided and p.grad.is_floating_point()]
    # (others: refused by the optimizer's own gradient check)
    bad = {id(ps[i]) for i in nonfinite_tensors([p.grad for p in ps])}
    # what this check proved, for the probe of this step (it clears the attribute before every step): the ids of
    # the parameters whose gradient is finite everywhere (a finite 2-norm), so it need not read those gradients
    optimizer.__dict__[FINITE_ATTR] = frozenset(id(p) for p in ps if id(p) not in bad)
    return bad


def skip_nonfinite(optimizer: torch.optim.Optimizer, ws: list[Tensor], states: list[list[Tensor]], gs: list[Tensor],
                   masked_step: Callable[[Tensor, list[Tensor], Tensor, Tensor], None], bad: set[int]
                   ) -> tuple[list[Tensor], list[list[Tensor]], list[Tensor]]:
    """Run ``masked_step(w, [state tensors], g_finite, ok)`` for every parameter in ``ws`` whose id is in ``bad``
    (:func:`nonfinite_params`; ``g_finite``: the non-finite entries set to 0; ``ok``: the finite mask), count the
    skipped entries in ``optimizer.state[w][STATE_KEY]``, and return the other tensors for the fast path."""
    rows = [i for i, w in enumerate(ws) if id(w) in bad]
    if not rows:
        return ws, states, gs
    for i in rows:
        g = gs[i]
        ok = torch.isfinite(g)
        masked_step(ws[i], [s[i] for s in states], torch.where(ok, g, torch.zeros((), dtype=g.dtype,
                                                                                   device=g.device)), ok)
        st: dict[str, Any] = optimizer.state[ws[i]]
        st[STATE_KEY] = int(st.get(STATE_KEY, 0)) + int((~ok).sum())
    keep = [i for i in range(len(ws)) if i not in set(rows)]
    return [ws[i] for i in keep], [[s[i] for i in keep] for s in states], [gs[i] for i in keep]
