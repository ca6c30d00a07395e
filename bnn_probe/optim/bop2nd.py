"""Bop2ndOrder: Bop with the gradient's second moment (Suarez-Ramirez et al., "A Bop and Beyond: A Second Order
Optimizer for Binarized Neural Networks", CVPR Workshops 2021, arXiv 2104.05124).

For every binary weight w ∈ {−1, +1} two real numbers, the first and second moments of its gradient:

    m_t = (1 − γ) · m_{t−1} + γ · g_t          (= m_{t−1} + γ (g_t − m_{t−1}))
    v_t = (1 − σ) · v_{t−1} + σ · g_t²         (= v_{t−1} + σ (g_t² − v_{t−1}))
    m̂_t = m_t / (sqrt(v_t) + ε)                                   (bias_correction=False, the "biased" form)
    m̂_t = (m_t / γ) / (sqrt(v_t / σ) + ε)                         (bias_correction=True, the paper's "unbiased" form)
    m̂_t = (m_t / c_t) / (sqrt(v_t / d_t) + ε),                    (adam_bias_correction=True, Adam's correction)
          c_t = 1 − Π_{s≤t} (1 − γ_s),  d_t = 1 − Π_{s≤t} (1 − σ_s)   (constant rates: 1 − (1 − γ)^t, 1 − (1 − σ)^t)
    w_t = −w_{t−1}  iff  w_{t−1} · m̂_t > τ    (strict)

A gradient entry that is NaN or ±inf is skipped: its m and v keep their previous values and
``state[p]["nonfinite_skipped"]`` counts it (:mod:`bnn_probe.optim.nonfinite`).

m_0 = v_0 = 0. What the paper's "unbiased" variant (Suarez-Ramirez et al. 2021) is: dividing m by γ and v by σ is
a constant rescaling, (m/γ)/(sqrt(v/σ) + ε) = (√σ/γ) · m/(sqrt(v) + ε·√σ), so the flip rule w·m̂ > τ is the
biased rule with the threshold τ' = τ·γ/√σ and ε' = ε·√σ (up to rounding): it changes the units of τ, and it
corrects no start-up bias. Adam's correction (Kingma & Ba 2015), which does remove the bias of m_0 = v_0 = 0 in the
first ~1/γ and ~1/σ steps, is ``adam_bias_correction=True`` (the products Π(1 − γ_s), Π(1 − σ_s) are kept per weight
tensor in the state as ``"bias_prod_m"`` / ``"bias_prod_v"``, so a schedule on γ or σ is corrected exactly); with
constant rates its m̂ tends to the biased form's as t grows. Because m is normalised by sqrt(v), one τ means roughly
the same thing in every layer. All hyperparameters are per param group; ``"lr"`` is an alias of ``"gamma"`` so LR
schedulers drive γ (see :mod:`bnn_probe.optim.bop`). State: ``exp_avg`` (m) and ``exp_avg_sq`` (v);
``bnn_family = "bop2nd"``.

``foreach`` (default): eager ``torch._foreach_*`` over all tensors; ``foreach=False``: a loop over tensors
(bit-identical); ``fused=True``: one ``torch.compile``d pass per tensor (m̂ equal up to
rounding), eager fallback.

Example:
    >>> import torch
    >>> from bnn_probe.optim import Bop2ndOrder
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    >>> opt = Bop2ndOrder([w], gamma=0.5, sigma=0.5, threshold=0.5)
    >>> w.grad = torch.tensor([2.0, 2.0]); opt.step()
    >>> w.data  # m̂ = 1/(sqrt(2)+ε) ≈ 0.707 > 0.5 for w=+1: flips
    tensor([-1., -1.])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._validate import GammaAliasOptimizer, check_bop_group, check_hparam
from .bop import CompiledKernel, _scalars
from .nonfinite import nonfinite_params, skip_nonfinite

__all__ = ["Bop2ndOrder"]


class Bop2ndOrder(GammaAliasOptimizer):
    """Bop2ndOrder (Suarez-Ramirez et al. 2021): flip w iff w · m̂_t > τ (see the module docstring for m̂).

    Args:
        params: binary weights (±1) or param groups.
        gamma: first-moment rate γ ∈ [0, 1] (``lr`` is an alias, for LR schedulers).
        sigma: second-moment rate σ ∈ [0, 1].
        threshold: τ ≥ 0, compared with the normalised momentum m̂.
        eps: ε ≥ 0 in the denominator.
        bias_correction: the paper's "unbiased" m̂ = (m/γ)/(sqrt(v/σ)+ε) (needs γ > 0 and σ > 0): the biased rule
            with τ' = τγ/√σ and ε' = ε√σ — a change of units of τ, not a start-up bias correction.
        adam_bias_correction: Adam's start-up correction m̂ = (m/c_t)/(sqrt(v/d_t)+ε), c_t = 1 − Π(1 − γ_s),
            d_t = 1 − Π(1 − σ_s) over the steps taken (not with ``bias_correction``).
        check_binary, foreach, fused: as in :class:`~bnn_probe.optim.Bop`.
    """

    bnn_family = "bop2nd"

    def __init__(self, params: Iterable[Any], gamma: float = 1e-4, sigma: float = 1e-4, threshold: float = 1e-8,
                 eps: float = 1e-10, bias_correction: bool = False, *, adam_bias_correction: bool = False,
                 check_binary: bool = False, foreach: bool | None = None, fused: bool | None = None) -> None:
        defaults = dict(gamma=gamma, lr=gamma, sigma=sigma, threshold=threshold, eps=eps,
                        bias_correction=bool(bias_correction), adam_bias_correction=bool(adam_bias_correction),
                        check_binary=bool(check_binary), foreach=foreach, fused=fused)
        _check_group(defaults)
        super().__init__(params, defaults)


    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError(f"tensor of shape {tuple(p.shape)} is not a parameter of this optimizer")

    @torch.no_grad()
    def normalized_momentum(self, p: Tensor) -> Tensor:
        """m̂ of ``p``, the quantity the flip rule compares with τ (zeros before the first step)."""
        group = self._group_of(p)
        state = self.state.get(p, {})
        if "exp_avg" not in state:
            return torch.zeros_like(p)
        if group.get("adam_bias_correction"):
            if "bias_prod_m" not in state:  # state from a run without the correction: nothing to correct by
                return torch.zeros_like(p)
            return _normalized([state["exp_avg"]], [state["exp_avg_sq"]], 1.0 - state["bias_prod_m"],
                               1.0 - state["bias_prod_v"], group["eps"], True)[0]
        return _normalized([state["exp_avg"]], [state["exp_avg_sq"]], *_check_group(group)[:2], group["eps"],
                           group["bias_correction"])[0]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Bop2ndOrder step on every parameter that has a gradient. Returns ``closure()`` when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        bad = nonfinite_params(self)  # NaN/±inf gradient entries are skipped (optim/nonfinite.py)
        for gi, group in enumerate(self.param_groups):
            gamma, sigma, threshold, eps = _check_group(group, gi)
            ws, (ms, vs), gs = skip_nonfinite(self, *self._gather(group, gi, ("exp_avg", "exp_avg_sq")),
                                              _masked(gamma, sigma, threshold, eps, group["bias_correction"],
                                                      self.state.__getitem__ if group.get("adam_bias_correction")
                                                      else None), bad)
            if not ws:
                continue
            args = (ws, ms, vs, gs, gamma, sigma, threshold, eps, group["bias_correction"])
            if group.get("adam_bias_correction"):
                for w, m, v, g in zip(ws, ms, vs, gs, strict=True):
                    st = self.state[w]
                    st["bias_prod_m"] = st.get("bias_prod_m", 1.0) * (1.0 - gamma)
                    st["bias_prod_v"] = st.get("bias_prod_v", 1.0) * (1.0 - sigma)
                    _step_eager([w], [m], [v], [g], gamma, sigma, threshold, eps, False,
                                divisors=(1.0 - st["bias_prod_m"], 1.0 - st["bias_prod_v"]))
            elif group["fused"]:
                _step_fused(*args)
            elif group["foreach"] is False:
                for w, m, v, g in zip(ws, ms, vs, gs, strict=True):
                    _step_eager([w], [m], [v], [g], *args[4:])
            else:
                _step_eager(*args)
        return loss


def _check_group(group: dict[str, Any], index: int | None = None) -> tuple[float, float, float, float]:
    where, gamma, threshold = check_bop_group(group, index, "Bop2ndOrder")
    sigma = check_hparam(f"sigma{where}", group["sigma"], upper=1.0)
    eps = check_hparam(f"eps{where}", group["eps"])
    if (group.get("bias_correction") or group.get("adam_bias_correction")) and (gamma == 0 or sigma == 0):
        raise ValueError(f"bias_correction=True divides by gamma and sigma: both must be positive, got gamma={gamma}, "
                         f"sigma={sigma}{where}")
    if group.get("bias_correction") and group.get("adam_bias_correction"):
        raise ValueError(f"bias_correction and adam_bias_correction exclude each other{where}")
    return gamma, sigma, threshold, eps


def _normalized(ms: list[Tensor], vs: list[Tensor], gamma: float, sigma: float, eps: float,
                bias_correction: bool) -> list[Tensor]:
    """m̂ = m/(sqrt(v)+ε), or (m/gamma)/(sqrt(v/sigma)+ε) with ``bias_correction`` (gamma, sigma: the divisors)."""
    if bias_correction:
        num = torch._foreach_div(ms, gamma)
        den = torch._foreach_div(vs, sigma)
        torch._foreach_sqrt_(den)
    else:
        num = ms
        den = torch._foreach_sqrt(vs)
    torch._foreach_add_(den, eps)
    return torch._foreach_div(num, den)


def _masked(gamma: float, sigma: float, threshold: float, eps: float, bias_correction: bool,
            state_of: Callable[[Tensor], dict] | None = None) -> Callable[[Tensor, list[Tensor], Tensor, Tensor], None]:
    """The step for a tensor holding non-finite gradient entries: m and v unchanged where ``ok`` is False, the flip
    rule applied to the resulting m̂ (finite entries as in :func:`_step_eager`). ``state_of``: the optimizer state of
    a weight tensor, for Adam's correction (its rate products advance for the whole tensor)."""

    def step(w: Tensor, states: list[Tensor], g: Tensor, ok: Tensor) -> None:
        m, v = states
        m.copy_(torch.where(ok, m.mul(1.0 - gamma).add_(g, alpha=gamma), m))
        v.copy_(torch.where(ok, v.mul(1.0 - sigma).addcmul_(g, g, value=sigma), v))
        c, d, bc = gamma, sigma, bias_correction
        if state_of is not None:
            st = state_of(w)
            st["bias_prod_m"] = st.get("bias_prod_m", 1.0) * (1.0 - gamma)
            st["bias_prod_v"] = st.get("bias_prod_v", 1.0) * (1.0 - sigma)
            c, d, bc = 1.0 - st["bias_prod_m"], 1.0 - st["bias_prod_v"], True
        x = _normalized([m], [v], c, d, eps, bc)[0].mul_(w).gt_(threshold)
        w.addcmul_(w, x, value=-2.0)

    return step


def _step_eager(ws: list[Tensor], ms: list[Tensor], vs: list[Tensor], gs: list[Tensor], gamma: float, sigma: float,
                threshold: float, eps: float, bias_correction: bool,
                divisors: tuple[float, float] | None = None) -> None:
    """One step; ``divisors`` (c, d): m̂ = (m/c)/(sqrt(v/d)+ε) instead (Adam's correction)."""
    torch._foreach_mul_(ms, 1.0 - gamma)
    torch._foreach_add_(ms, gs, alpha=gamma)
    torch._foreach_mul_(vs, 1.0 - sigma)
    torch._foreach_addcmul_(vs, gs, gs, value=sigma)
    if divisors is not None:
        x = _normalized(ms, vs, divisors[0], divisors[1], eps, True)
    else:
        x = _normalized(ms, vs, gamma, sigma, eps, bias_correction)
    torch._foreach_mul_(x, ws)  # x = w·m̂
    for xc in x:  # flag = [w·m̂ > τ] as 0./1.
        xc.gt_(threshold)
    torch._foreach_addcmul_(ws, ws, x, value=-2.0)  # w ← −w where flagged


def _kernel(w: Tensor, m: Tensor, v: Tensor, g: Tensor, omg: Tensor, gamma: Tensor, oms: Tensor, sigma: Tensor,
            threshold: Tensor, eps: Tensor) -> None:
    m_new = m * omg + g * gamma
    v_new = v * oms + g * g * sigma
    mhat = m_new / (torch.sqrt(v_new) + eps)
    w_new = torch.where(w * mhat > threshold, -w, w)
    m.copy_(m_new)
    v.copy_(v_new)
    w.copy_(w_new)


def _kernel_unbiased(w: Tensor, m: Tensor, v: Tensor, g: Tensor, omg: Tensor, gamma: Tensor, oms: Tensor,
                     sigma: Tensor, threshold: Tensor, eps: Tensor) -> None:
    m_new = m * omg + g * gamma
    v_new = v * oms + g * g * sigma
    mhat = (m_new / gamma) / (torch.sqrt(v_new / sigma) + eps)
    w_new = torch.where(w * mhat > threshold, -w, w)
    m.copy_(m_new)
    v.copy_(v_new)
    w.copy_(w_new)


_FUSED = {False: CompiledKernel(_kernel, "Bop2ndOrder"), True: CompiledKernel(_kernel_unbiased, "Bop2ndOrder")}


def _step_fused(ws: list[Tensor], ms: list[Tensor], vs: list[Tensor], gs: list[Tensor], gamma: float, sigma: float,
                threshold: float, eps: float, bias_correction: bool) -> None:
    kernel = _FUSED[bool(bias_correction)]
    for k, (w, m, v, g) in enumerate(zip(ws, ms, vs, gs, strict=True)):
        if not all(t.is_contiguous() for t in (w, m, v, g)):
            _step_eager([w], [m], [v], [g], gamma, sigma, threshold, eps, bias_correction)
            continue
        sc = _scalars(w, 1.0 - gamma, gamma, 1.0 - sigma, sigma, threshold, eps)
        if not kernel(w.view(-1), m.view(-1), v.view(-1), g.view(-1), *sc):
            _step_eager(ws[k:], ms[k:], vs[k:], gs[k:], gamma, sigma, threshold, eps, bias_correction)
            return


Bop2ndOrder.validate_group = staticmethod(_check_group)
