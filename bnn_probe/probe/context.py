"""Per-layer device state kept between steps, and the per-step context quantities read from.

Notation (docs/quantities.md): w_{t−1}, w_t the weight before/after optimizer step t, sign(x) = +1 iff x ≥ 0
(more generally b(w), the layer's binarizer: probe/binarizers.py),
m_t the Bop momentum after step t (Bop2ndOrder: m̂_t = m_t / (sqrt(v_t) + eps)), τ the threshold in force.

Everything here stays on the parameter's device: no ``.item()``, no host synchronisation.
"""

from __future__ import annotations

from functools import cached_property

import torch
from torch import Tensor

from .binary_detect import LayerInfo, clip_value_of

__all__ = ["LayerState", "StepContext", "hash_coefficients", "HASH_SEED"]

HASH_SEED = 20190604
_HASH_CACHE: dict[tuple[int, str], Tensor] = {}


def hash_coefficients(n: int, device: torch.device) -> Tensor:
    """r_i, i < n: int32 in [0, 2^31 − 1) from a CPU generator seeded with :data:`HASH_SEED` (same on every machine).

    ``sign_hash = Σ_{i: w_i ≥ 0} r_i`` (int64); equal sign vectors give equal hashes on any device.
    """
    key = (n, str(device))
    if key not in _HASH_CACHE:
        g = torch.Generator().manual_seed(HASH_SEED)
        _HASH_CACHE[key] = torch.randint(0, 2**31 - 1, (n,), generator=g, dtype=torch.int32).to(device)
    return _HASH_CACHE[key]


def _positive(layer: LayerInfo, flat: Tensor) -> Tensor:
    """[b(w) = +1] of a flat copy of the layer's weights through its binarizer (the reference of the flat stage)."""
    b = layer.binarizer
    return flat >= 0 if b.is_default else b.positive(flat.view(layer.param.shape)).reshape(-1)


def _margin(layer: LayerInfo, flat: Tensor) -> Tensor:
    b = layer.binarizer
    return flat.abs() if b.is_default else b.margin(flat.view(layer.param.shape)).reshape(-1)


class LayerState:
    """Device tensors the probe keeps for one binary parameter.

    * ``prev_sign`` (bool): sign(w_{t−1}), written by the pre-step hook (Bop family);
      ``prev_w`` (float): w̃_{t−1} itself for latent layers (inertia of flipped weights before the step).
    * ``sign0`` (bool): sign(w_0) at attach, for C2I.
    * ``count`` (int32): flips of each weight since attach; ``last`` (int32): step of its last flip (0 = never).
    * ``prev_above`` (bool): |m_{t−1}| > τ (Bop family), for threshold crossings.
    * ``prev_m`` (float): m_{t−1} (Bop; Bop2ndOrder: m̂_{t−1}) as measured at the previous step (at attach: the
      optimizer state then, zeros without one), for ``step_size``; None until set.
    * ``q_idx``: the fixed quantile sample (None = all weights), ``t_idx``: the tracked weights.
    """

    def __init__(self, layer: LayerInfo, q_idx: Tensor | None, t_idx: Tensor, sign_hash: bool = True) -> None:
        p = layer.param.detach()
        dev = p.device
        self.layer = layer
        flat = p.reshape(-1)
        self.sign0 = _positive(layer, flat)
        self.prev_sign = self.sign0.clone()
        self.prev_w: Tensor | None = flat.clone() if layer.family == "latent" else None
        self.count = torch.zeros(flat.numel(), dtype=torch.int32, device=dev)
        self.last = torch.zeros(flat.numel(), dtype=torch.int32, device=dev)
        self.prev_above: Tensor | None = None
        self.prev_m: Tensor | None = None
        self.q_idx = q_idx.to(dev) if q_idx is not None else None
        self.t_idx = t_idx.to(dev)
        self.mix = hash_coefficients(flat.numel(), dev) if sign_hash else None

    def before_step(self) -> None:
        """Pre-step hook: remember sign(w_{t−1}) (and w̃_{t−1} for latent layers)."""
        w = self.layer.param.detach().reshape(-1)
        if self.prev_w is not None:
            self.prev_w.copy_(w)
        else:
            self.prev_sign.copy_(_positive(self.layer, w))

    def state_dict(self) -> dict[str, Tensor | None]:
        return {k: (None if v is None else v.detach().cpu().clone()) for k, v in (
            ("sign0", self.sign0), ("count", self.count), ("last", self.last), ("prev_above", self.prev_above),
            ("q_idx", self.q_idx), ("t_idx", self.t_idx))}

    def load_state_dict(self, sd: dict[str, Tensor | None]) -> None:
        dev = self.sign0.device
        for k in ("sign0", "count", "last", "t_idx"):
            setattr(self, k, sd[k].to(dev).clone())
        self.q_idx = None if sd.get("q_idx") is None else sd["q_idx"].to(dev)
        self.prev_above = None if sd.get("prev_above") is None else sd["prev_above"].to(dev)


class StepContext:
    """Lazily computed intermediates of one layer at one step (each computed once, shared by the quantities)."""

    def __init__(self, state: LayerState, step: int, probed: torch.optim.Optimizer) -> None:
        self.state = state
        self.layer = state.layer
        self.family = state.layer.family
        self.step = step
        self.probed = probed
        self.group = state.layer.group
        self.n = state.layer.n

    # --- hyperparameters in force (host floats) ---
    @property
    def tau(self) -> float:
        return float(self.group.get(self.layer.extra.get("threshold_key", "threshold"), float("nan")))

    @property
    def gamma(self) -> float:
        return float(self.group.get(self.layer.extra.get("gamma_key", "gamma"), float("nan")))

    @property
    def clip_value(self) -> float | None:
        return clip_value_of(self.probed, self.layer.optimizer)

    # --- weights and signs ---
    @cached_property
    def w(self) -> Tensor:
        return self.layer.param.detach().reshape(-1)

    @cached_property
    def sign(self) -> Tensor:
        return _positive(self.layer, self.w)

    @cached_property
    def prev_sign(self) -> Tensor:
        if self.state.prev_w is not None:
            return _positive(self.layer, self.state.prev_w)
        return self.state.prev_sign

    @cached_property
    def flipped(self) -> Tensor:
        return self.sign != self.prev_sign

    @cached_property
    def grad(self) -> Tensor | None:
        g = self.layer.param.grad
        return None if g is None else g.detach().reshape(-1)

    # --- Bop family ---
    @cached_property
    def opt_state(self) -> dict:
        return self.layer.optimizer.state.get(self.layer.param, {})

    @cached_property
    def m(self) -> Tensor:
        """m_t (Bop) or the normalised m̂_t (Bop2ndOrder), flattened."""
        st = self.opt_state
        key = self.layer.extra.get("momentum_key", "exp_avg")
        if key not in st:
            return torch.zeros_like(self.w)
        if self.family == "bop2nd":
            fn = getattr(self.layer.optimizer, "normalized_momentum", None)
            if fn is not None:
                return fn(self.layer.param).detach().reshape(-1)
            return normalize_2nd(st[key].reshape(-1), st["exp_avg_sq"].reshape(-1), self.group, st)
        return st[key].detach().reshape(-1)

    @cached_property
    def wm(self) -> Tensor:
        return self.w * self.m

    @cached_property
    def margin(self) -> Tensor:
        """The pre-decision margin w_{t−1}·m_t (Bop2ndOrder: w_{t−1}·m̂_t): −w_t·m_t where the sign changed."""
        return torch.where(self.flipped, -self.wm, self.wm)

    @cached_property
    def abs_m(self) -> Tensor:
        return self.m.abs()

    @cached_property
    def above(self) -> Tensor:
        return self.abs_m > self.tau

    def prev_momentum_at(self, idx: Tensor) -> Tensor:
        """m_{t−1} (Bop) or m̂_{t−1} (Bop2ndOrder) at ``idx``, reconstructed from m_t, g_t (and v_t):
        m_{t−1} = (m_t − γ g_t)/(1 − γ), v_{t−1} = (v_t − σ g_t²)/(1 − σ). NaN when γ = 1; m_t when no gradient."""
        st = self.opt_state
        key = self.layer.extra.get("momentum_key", "exp_avg")
        if key not in st:
            return torch.zeros(idx.shape, dtype=self.w.dtype, device=self.w.device)
        m = st[key].reshape(-1)[idx]
        g = self.grad
        gamma = self.gamma
        if g is not None:
            gi = g[idx]
            m = (m - gamma * gi) / (1 - gamma) if gamma != 1 else torch.full_like(m, float("nan"))
        if self.family != "bop2nd":
            return m
        v = st["exp_avg_sq"].reshape(-1)[idx]
        sigma = float(self.group.get("sigma", float("nan")))
        if g is not None:
            v = (v - sigma * gi * gi) / (1 - sigma) if sigma != 1 else torch.full_like(v, float("nan"))
            v = v.clamp_min(0)
        return normalize_2nd(m, v, self.group, st, back=1 if g is not None else 0)

    def inertia_at(self, idx: Tensor) -> Tensor:
        """Inertia after the step at ``idx``: latent margin(w̃_t) (|w̃_t| for sign), Bop family τ − w_t·m_t (float64)."""
        if self.family == "latent":
            return _margin(self.layer, self.w)[idx].double()
        return self.tau - (self.w[idx] * self.m[idx]).double()

    def inertia_before_at(self, idx: Tensor) -> Tensor:
        """Inertia just before the step at ``idx``: latent margin(w̃_{t−1}), Bop family τ − w_{t−1}·m_{t−1}."""
        if self.family == "latent":
            return _margin(self.layer, self.state.prev_w)[idx].double()
        w_prev = torch.where(self.prev_sign[idx], 1.0, -1.0).to(self.w.dtype)
        return self.tau - (w_prev * self.prev_momentum_at(idx)).double()

    def step_size_at(self, idx: Tensor) -> Tensor:
        """|state_t − state_{t−1}| at ``idx`` (float64): latent |w̃_t − w̃_{t−1}|; Bop family |m_t − m_{t−1}|
        (Bop2ndOrder: m̂), m_{t−1} as measured at the previous step (NaN before any)."""
        if self.family == "latent":
            return (self.w[idx].double() - self.state.prev_w[idx].double()).abs()
        prev = self.state.prev_m
        if prev is None:
            return torch.full(idx.shape, float("nan"), dtype=torch.float64, device=self.w.device)
        return (self.m[idx].double() - prev[idx].double()).abs()

    def commit(self) -> None:
        """End of step: update per-weight flip counters, last-flip steps, the above-threshold mask and m_{t−1}."""
        st = self.state
        fl = self.flipped
        st.count.add_(fl)
        st.last.masked_fill_(fl, self.step)
        if self.family != "latent":
            st.prev_m = self.m.clone()
            if self.tau == self.tau:
                st.prev_above = self.above


def normalize_2nd(m: Tensor, v: Tensor, group: dict, state: dict | None = None, back: int = 0) -> Tensor:
    """Bop2ndOrder's normalised momentum: m/(sqrt(v)+eps), or (m/γ)/(sqrt(v/σ)+eps) with ``bias_correction``, or
    (m/c)/(sqrt(v/d)+eps) with ``adam_bias_correction`` (c = 1 − Π(1−γ_s), d = 1 − Π(1−σ_s) from ``state``'s
    ``bias_prod_m`` / ``bias_prod_v``; ``back=1``: the products of the step before, for m_{t−1}, v_{t−1})."""
    eps = float(group.get("eps", 1e-10))
    if group.get("adam_bias_correction"):
        if not state or "bias_prod_m" not in state:
            return torch.zeros_like(m)
        pm, pv = float(state["bias_prod_m"]), float(state["bias_prod_v"])
        if back:
            pm, pv = pm / (1 - float(group["gamma"])), pv / (1 - float(group["sigma"]))
        c, d = 1.0 - pm, 1.0 - pv
        if c <= 0 or d <= 0:  # before the first step: m = v = 0
            return torch.zeros_like(m)
        return (m / c) / ((v / d).sqrt() + eps)
    if group.get("bias_correction"):
        return (m / float(group["gamma"])) / ((v / float(group["sigma"])).sqrt() + eps)
    return m / (v.sqrt() + eps)
