"""Helpers for the probe tests: minimal Bop / Bop2ndOrder (used until bnn_probe.optim lands), a one-layer model
and margins placed on the margin ladder's points."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bnn_probe.nn import mark_binary
from bnn_probe.runlog.schema import MARGIN_LADDER

try:  # the real optimizers, once they exist
    from bnn_probe.optim import Bop as _RealBop  # type: ignore[attr-defined]
except Exception:  # noqa: BLE001
    _RealBop = None


class MiniBop(torch.optim.Optimizer):
    """m ← (1−γ) m + γ g; flip w where w·m > τ."""

    bnn_family = "bop"

    def __init__(self, params, gamma: float = 0.5, threshold: float = 0.1) -> None:
        super().__init__(params, {"gamma": gamma, "threshold": threshold})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p)
                m = st["exp_avg"]
                m.mul_(1 - g["gamma"]).add_(p.grad, alpha=g["gamma"])
                p.copy_(torch.where(p * m > g["threshold"], -p, p))


class MiniBop2nd(torch.optim.Optimizer):
    """m ← m + γ(g − m), v ← v + σ(g² − v); flip where w·m/(sqrt(v)+eps) > τ."""

    bnn_family = "bop2nd"

    def __init__(self, params, gamma: float = 0.5, sigma: float = 0.5, threshold: float = 0.5,
                 eps: float = 1e-10) -> None:
        super().__init__(params, {"gamma": gamma, "sigma": sigma, "threshold": threshold, "eps": eps,
                                  "bias_correction": False})

    def normalized_momentum(self, p):
        st = self.state[p]
        g = next(g for g in self.param_groups if any(q is p for q in g["params"]))
        return st["exp_avg"] / (st["exp_avg_sq"].sqrt() + g["eps"])

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["exp_avg"].add_(p.grad - st["exp_avg"], alpha=g["gamma"])
                st["exp_avg_sq"].add_(p.grad * p.grad - st["exp_avg_sq"], alpha=g["sigma"])
                mh = self.normalized_momentum(p)
                p.copy_(torch.where(p * mh > g["threshold"], -p, p))


class OneLayer(nn.Module):
    """A single binary parameter ``w`` (marked binary) of a given initial value, plus a real bias."""

    def __init__(self, w0: torch.Tensor) -> None:
        super().__init__()
        self.w = mark_binary(nn.Parameter(w0.clone()))
        self.b = nn.Parameter(torch.zeros(1))


def set_grad(model: OneLayer, g: torch.Tensor) -> None:
    model.w.grad = g.clone()
    model.b.grad = torch.zeros(1)


SHAPES = [(6, 5), (40, 30), (3, 3, 2, 2), (7,)]  # four binary "layers" of different ranks and sizes
MULTI_KINDS = ["bop", "bop_per_layer_tau", "bop2nd_bc", "bop2nd_adam_bc", "sgd_clip", "adam", "mixed"]


class Multi(nn.Module):
    """Parameters w0…w3 of SHAPES, marked binary: ±1 (Bop) or 0.3·N(0, 1) (latent)."""

    def __init__(self, seed: int, latent: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for i, s in enumerate(SHAPES):
            w = torch.randn(s, generator=g)
            w = w * 0.3 if latent else torch.where(w >= 0, 1.0, -1.0)
            setattr(self, f"w{i}", mark_binary(nn.Parameter(w)))


def multi_setup(kind: str):
    """A Multi model and its optimizer for one of MULTI_KINDS (per-layer τ, Bop2ndOrder with bias correction,
    SGD with clipping at ``opt.bnn_clip_value``, Adam, or Bop + SGD in a CaseOptimizer)."""
    from bnn_probe.optim import Bop, Bop2ndOrder, CaseOptimizer

    latent = kind in ("sgd_clip", "adam")
    model = Multi(1, latent=latent)
    ps = list(model.parameters())
    if kind == "bop":
        opt = Bop(ps, gamma=0.3, threshold=0.05)
    elif kind == "bop_per_layer_tau":
        opt = Bop([{"params": [p], "threshold": 0.02 * (i + 1), "gamma": 0.2 + 0.1 * i} for i, p in enumerate(ps)])
    elif kind == "bop2nd_bc":
        opt = Bop2ndOrder(ps, gamma=0.3, sigma=0.2, threshold=0.5, bias_correction=True)
    elif kind == "bop2nd_adam_bc":
        opt = Bop2ndOrder(ps, gamma=0.3, sigma=0.2, threshold=0.5, adam_bias_correction=True)
    elif kind == "sgd_clip":
        opt = torch.optim.SGD(ps, lr=0.2)

        def clip(o, a, k):
            with torch.no_grad():
                for p in ps:
                    p.clamp_(-opt.bnn_clip_value, opt.bnn_clip_value)
        opt.register_step_post_hook(clip)
        opt.bnn_clip_value = 0.25
    elif kind == "adam":
        opt = torch.optim.Adam(ps, lr=0.05)
    else:
        lat = [ps[1], ps[3]]
        with torch.no_grad():
            for p in lat:
                p.mul_(0.3)
        opt = CaseOptimizer(Bop([ps[0], ps[2]], gamma=0.3, threshold=0.05), torch.optim.SGD(lat, lr=0.2))
    return model, opt


def ladder_margins(tau: float, finite: bool = False) -> np.ndarray:
    """float32 margins at each point k·τ of the margin ladder (as float32) and one ulp either side, ±0, the largest
    floats of either sign, the smallest normal and subnormal floats, and (unless ``finite``) ±inf and NaN; with
    ``finite`` the non-finite points are left out too."""
    f = np.float32
    with np.errstate(over="ignore"):  # e.g. 8·1e38 is +inf in float32
        pts = [f(k * tau) for k in MARGIN_LADDER]
    vals = [v for p in pts if np.isfinite(p) or not finite
            for v in (p, np.nextafter(p, f(np.inf)), np.nextafter(p, f(-np.inf)))]
    vals += [0.0, -0.0, np.finfo(f).max, -np.finfo(f).max, np.finfo(f).tiny, np.finfo(f).smallest_subnormal]
    if not finite:
        vals += [np.inf, -np.inf, np.nan]
    return np.array(vals, dtype=f)
