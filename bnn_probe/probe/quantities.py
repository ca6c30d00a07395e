"""The per-(step, layer) quantities of the ``steps`` table, one small class each (formulas: docs/quantities.md).

Each quantity names its ``columns``, the ``families`` it applies to and computes, on the device, one float64
tensor per column (0-d, or 1-d for quantile vectors) from a :class:`~bnn_probe.probe.context.StepContext`.
Integer columns (``int_columns``) come back as int64. Nothing here synchronises with the host.

Example (hand check of :class:`Flips`):
    >>> import torch
    >>> from types import SimpleNamespace
    >>> ctx = SimpleNamespace(flipped=torch.tensor([True, False, True]))
    >>> Flips().compute(ctx)
    [tensor(2)]
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..runlog.schema import MARGIN_EXCEED, MARGIN_LADDER, MARGIN_Q, MARGIN_QUANTILES
from .context import StepContext

__all__ = [
    "QUANTILES", "Quantity", "Flips", "FromInit", "NonFiniteGrads", "SignHash", "BopThreshold", "DecisionMargin",
    "MomentumDistribution",
    "LatentInertia", "AdamStep", "default_quantities", "quantile_columns",
]

QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.50, 0.75, 0.95)
_QCACHE: dict[tuple, tuple[Tensor, Tensor]] = {}


def quantile_columns(prefix: str, qs: tuple[float, ...] = QUANTILES) -> tuple[str, ...]:
    return tuple(f"{prefix}_q{round(q * 100):02d}" for q in qs)


def _quantiles(x: Tensor, qs: tuple[float, ...] = QUANTILES) -> Tensor:
    """numpy-"linear" quantiles along the last dim of ``x`` (1-d sample, or [k, n] for k samples at once), float64.

    q-quantile of a sorted sample s_0 ≤ … ≤ s_{n−1}: s_lo + (s_hi − s_lo)·f, lo = ⌊q(n−1)⌋, hi = ⌈q(n−1)⌉,
    f = q(n−1) − lo. NaN for an empty sample. One sort, one gather (cheaper than ``torch.quantile``)."""
    n = x.shape[-1]
    if n == 0:
        return torch.full((*x.shape[:-1], len(qs)), float("nan"), dtype=torch.float64, device=x.device)
    key = (str(x.device), qs, n)
    if key not in _QCACHE:
        pos = torch.tensor(qs, dtype=torch.float64) * (n - 1)
        lo = pos.floor()
        _QCACHE[key] = (torch.cat([lo, pos.ceil()]).long().to(x.device), (pos - lo).to(x.device))
    idx, frac = _QCACHE[key]
    v = torch.sort(x.double(), dim=-1).values.index_select(-1, idx)
    lo_v, hi_v = v[..., : len(qs)], v[..., len(qs):]
    return lo_v + (hi_v - lo_v) * frac


def _sample(ctx: StepContext, x: Tensor) -> Tensor:
    idx = ctx.state.q_idx
    return x if idx is None else x[idx]


def _count(mask: Tensor) -> Tensor:
    return mask.sum(dtype=torch.float64)


class Quantity:
    """Base class. ``columns``: names in the steps table; ``int_columns``: those stored as int64."""

    name: str = ""
    columns: tuple[str, ...] = ()
    int_columns: tuple[str, ...] = ()
    families: tuple[str, ...] = ("bop", "bop2nd", "latent")

    def applies(self, ctx: StepContext) -> bool:
        return ctx.family in self.families

    def compute(self, ctx: StepContext) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class Flips(Quantity):
    """flips = #{i : sign(w_t,i) ≠ sign(w_{t−1},i)}; flip_ratio = flips/n (host) and its running mean (host)."""

    name = "flips"
    columns = ("flips",)
    int_columns = ("flips",)

    def compute(self, ctx) -> list[Tensor]:
        return [ctx.flipped.sum()]


class FromInit(Quantity):
    """c2i_diff = #{i : sign(w_t,i) ≠ sign(w_0,i)}, w_0 at attach; the host writes c2i = 1 − c2i_diff/n."""

    name = "c2i"
    columns = ("c2i_diff",)
    int_columns = ("c2i_diff",)

    def compute(self, ctx) -> list[Tensor]:
        return [(ctx.sign != ctx.state.sign0).sum()]


class NonFiniteGrads(Quantity):
    """nonfinite_grads = #{i : g_t,i is NaN or ±inf} (0 when the parameter has no gradient)."""

    name = "nonfinite_grads"
    columns = ("nonfinite_grads",)
    int_columns = ("nonfinite_grads",)

    def compute(self, ctx) -> list[Tensor]:
        g = ctx.grad
        if g is None:
            return [torch.zeros((), dtype=torch.int64, device=ctx.w.device)]
        return [ctx.n - torch.isfinite(g).sum()]


class SignHash(Quantity):
    """sign_hash = Σ_{i : w_t,i ≥ 0} r_i (int64), r fixed pseudo-random (context.hash_coefficients)."""

    name = "sign_hash"
    columns = ("sign_hash",)
    int_columns = ("sign_hash",)

    def compute(self, ctx) -> list[Tensor]:
        return [torch.sum(ctx.state.mix * ctx.sign, dtype=torch.int64)]


class BopThreshold(Quantity):
    """Bop family counts against τ (m = m_t, or m̂_t for Bop2ndOrder):

    above_threshold = #{|m_t| > τ}, crossings_up = #{|m_{t−1}| ≤ τ < |m_t|}, crossings_down = #{|m_{t−1}| > τ ≥ |m_t|}.
    (After Bop's step every weight with |m_t| > τ sits on the settled side, w_t·m_t < −τ, so the flips are
    #{w_{t−1}·m_t > τ}: what predicts them is :class:`DecisionMargin`.)
    """

    name = "bop_threshold"
    columns = ("above_threshold", "crossings_up", "crossings_down")
    families = ("bop", "bop2nd")

    def compute(self, ctx) -> list[Tensor]:
        above = ctx.above
        prev = ctx.state.prev_above
        n_above = _count(above)
        if prev is None:
            up = down = torch.full((), float("nan"), dtype=torch.float64, device=above.device)
        else:
            up = _count(above > prev)
            down = _count(prev > above)
        return [n_above, up, down]


class DecisionMargin(Quantity):
    """The pre-decision margin x = w_{t−1}·m_t (Bop2ndOrder: w_{t−1}·m̂_t), the quantity Bop's rule compares with τ
    (flip iff x > τ; Helwegen et al. 2019, Alg. 1):

    margin_exceed_<k> = #{x > k·τ} for k ∈ {1/8, 1/4, 1/2, 1, 2, 4, 8} (all weights; k·τ rounded to the weights'
    dtype, exact for these powers of two), so margin_exceed_1 = flips for Bop itself and the others are the flips each
    layer would have had at k·τ with the same m_t; margin_q50 … margin_q999: quantiles of x on the quantile sample.
    """

    name = "margin"
    columns = (*MARGIN_EXCEED, *MARGIN_Q)
    families = ("bop", "bop2nd")

    def compute(self, ctx) -> list[Tensor]:
        x, tau = ctx.margin, ctx.tau
        return [*(_count(x > k * tau) for k in MARGIN_LADDER), _quantiles(_sample(ctx, x), MARGIN_QUANTILES)]


class MomentumDistribution(Quantity):
    """abs_m_mean = mean |m_t| (all weights); abs_m_q.. and wm_q.. : quantiles of |m_t| and w_t·m_t on the sample."""

    name = "momentum"
    columns = ("abs_m_mean", *quantile_columns("abs_m"), *quantile_columns("wm"))
    families = ("bop", "bop2nd")

    def compute(self, ctx) -> list[Tensor]:
        mean = torch.linalg.vector_norm(ctx.m, 1, dtype=torch.float64) / ctx.n
        return [mean, _quantiles(torch.stack([_sample(ctx, ctx.abs_m), _sample(ctx, ctx.wm)])).reshape(-1)]


class LatentInertia(Quantity):
    """abs_w_mean = mean |w̃_t|; abs_w_q.. quantiles of |w̃_t| (sample); at_clip = #{|w̃_t| ≥ clip} (NaN w/o clip)."""

    name = "inertia"
    columns = ("abs_w_mean", *quantile_columns("abs_w"), "at_clip")
    families = ("latent",)

    def compute(self, ctx) -> list[Tensor]:
        w = ctx.w
        mean = torch.linalg.vector_norm(w, 1, dtype=torch.float64) / ctx.n
        clip = ctx.clip_value
        if clip is None:
            at_clip = torch.full((), float("nan"), dtype=torch.float64, device=w.device)
        else:
            at_clip = _count(w.abs() >= clip)
        return [mean, _quantiles(_sample(ctx, w).abs()), at_clip]


class AdamStep(Quantity):
    """adam_step_q50/q95: quantiles (sample) of |m̂/(sqrt(v̂)+eps)|, m̂ = exp_avg/(1−β1^k), v̂ = exp_avg_sq/(1−β2^k)."""

    name = "adam_step"
    columns = ("adam_step_q50", "adam_step_q95")
    families = ("latent",)

    def applies(self, ctx) -> bool:
        return ctx.family == "latent" and isinstance(ctx.layer.optimizer, (torch.optim.Adam, torch.optim.AdamW))

    def compute(self, ctx) -> list[Tensor]:
        st = ctx.opt_state
        if "exp_avg" not in st:
            return [torch.full((2,), float("nan"), dtype=torch.float64, device=ctx.w.device)]
        b1, b2 = ctx.group["betas"]
        k = st["step"]
        k = float(k) if not (isinstance(k, Tensor) and k.device.type != "cpu") else k.double()
        m = _sample(ctx, st["exp_avg"].reshape(-1)).double() / (1 - b1**k)
        v = _sample(ctx, st["exp_avg_sq"].reshape(-1)).double() / (1 - b2**k)
        return [_quantiles((m / (v.sqrt() + ctx.group["eps"])).abs(), (0.5, 0.95))]


def default_quantities(sign_hash: bool = True) -> list[Quantity]:
    qs: list[Quantity] = [Flips(), FromInit(), NonFiniteGrads()]
    if sign_hash:
        qs.append(SignHash())
    qs += [BopThreshold(), DecisionMargin(), MomentumDistribution(), LatentInertia(), AdamStep()]
    return qs
