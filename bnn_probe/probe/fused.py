"""The probe's every-step device computation as one pure function of tensors (optionally ``torch.compile``-d).

:func:`make_step_fn` returns ``step(s, log, trk, ev)`` for one flat group (probe/flat.py): ``s`` is a dict of tensors
(this step's flat w, m, g and pre-step weights, τ / clip per layer, the step index as a 0-d tensor, the event
sampler's uniforms, the fixed index tensors, and the persistent per-weight state: counters, last flip step, |m| > τ
mask and w·m of the previous step, which the function updates in place). Everything that varies by step enters as a
tensor and the Python constants (layer sizes, bits, E) are closed over, so a compiled ``step`` has static shapes, no
data-dependent control flow and compiles once per (group layout, log/trk/ev combination) — not per step.

The arithmetic is the device path of the probe (same comparisons in the weights' dtype, float64 where the CPU pass
uses float64), so the values are those of the compiled CPU pass (probe/onepass.py): integer columns exactly, floats
to rounding of the float64 segment sums (tests/test_probe_flat.py, tests/test_probe_compiled.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ..runlog.schema import MARGIN_LADDER

__all__ = ["make_step_fn", "maybe_compile", "step_fn"]

_NAN = float("nan")


def _quantiles(x: Tensor, pos: Tensor, frac: Tensor) -> Tensor:
    """x: [..., L, K] samples (NaN-padded) → [..., L, Q] numpy-"linear" quantiles (float64)."""
    return _at_positions(x.sort(dim=-1).values, pos, frac)


def _at_positions(v: Tensor, pos: Tensor, frac: Tensor) -> Tensor:
    """v: [..., L, K] sorted samples → [..., L, Q] quantiles at the [L, 2Q] positions (float64)."""
    v = v.gather(-1, pos.expand(*v.shape[:-1], pos.shape[-1])).double()
    q = frac.shape[-1]
    lo, hi = v[..., :q], v[..., q:]
    return lo + (hi - lo) * frac


def make_step_fn(bop: bool, ns: list[int], n_bits: int, events: int, sign_hash: bool, has_pad: bool,
                 binarized: bool = False) -> Callable:
    """The pure every-step function of one group (see the module docstring); constants only are closed over.

    ``binarized``: some layer has a binarizer other than bnn-probe's sign (probe/binarizers.py); the binarizer
    stage then runs before this function and ``s`` carries ``sign``/``prev_sign`` (bool [b(w) = +1] after and before
    the step) and, for latent groups, ``margin``/``prev_margin`` (the binarizer's margin = latent inertia)."""
    ns = tuple(int(n) for n in ns)
    L, N, NB, E = len(ns), sum(ns), 1 << n_bits, int(events)

    def _sample(s: dict, x: Tensor) -> Tensor:
        v = x[s["qsel"]]
        return torch.where(s["qpad"], _NAN, v) if has_pad else v

    def _layer_abs_mean(s: dict, ax: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # per-layer float64 sums (fused by Inductor)
            sums = torch.stack([a.sum(dtype=torch.float64) for a in ax.split(ns)])
        else:  # eager: one fused foreach call instead of 2·L ops
            sums = torch.stack(torch._foreach_norm(list(ax.split(ns)), 1, dtype=torch.float64))
        return sums / s["n_f"]

    def _counts(s: dict, masks: list[Tensor]) -> Tensor:
        code = masks[0].to(torch.uint8)
        for k, mk in enumerate(masks[1:], start=1):
            code = code + (mk.to(torch.uint8) << k)
        idx = s["code_base"] + code  # layer·2^B + code + 0.5: the centre of its histc bin (no rounding at an edge)
        h = torch.histc(idx, bins=L * NB, min=0, max=L * NB)
        return h.view(L, NB).to(torch.float64) @ s["count_mat"]  # [L, C] exact counts

    def _hash(s: dict, sign: Tensor) -> Tensor:
        if not sign_hash:
            return s["missing_hash"]
        cs = torch.cumsum(s["mix"] * sign, 0, dtype=torch.int64)  # exact, wrapping
        cs = torch.cat([cs.new_zeros(1), cs])
        b = cs[s["bounds"]]
        return (b[L:] - b[:L]).unsqueeze(1)

    def _events(s: dict, flipped: Tensor, floats_of: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        cb = torch.cumsum(flipped, 0, dtype=torch.int32)
        b = torch.cat([cb.new_zeros(1), cb])[s["bounds"]]
        c_prev = b[:L].unsqueeze(1)
        f = b[L:].unsqueeze(1) - c_prev  # [L, 1] flips per layer
        strat = ((s["u"] + s["ev_j"]) * f / E).floor() + 1
        ranks = torch.where(f <= E, s["ev_j1"], strat).to(torch.int32)
        valid = ranks <= f
        gidx = torch.searchsorted(cb, ranks + c_prev).clamp_max(N - 1)
        st = s["starts"].unsqueeze(1)
        safe = torch.where(valid, gidx, st).view(-1)
        local = torch.where(valid, gidx - st, -1).view(-1)
        last = s["last"][safe]
        since = torch.where(last > 0, s["t"] - last, -1)
        floats = torch.where(valid.view(-1, 1), floats_of(safe), _NAN)  # [L·E, 2]: inertia_before, step_size
        return torch.stack([local, since.to(torch.int64)], 1), floats

    def step(s: dict, log: bool, trk: bool, ev: bool, quant: bool = True) -> dict:
        out: dict = {}
        w = s["w"]
        sign = s["sign"] if binarized else w >= 0
        flipped = sign != (s["prev_sign"] if binarized else s["prev_w"] >= 0)
        if bop:
            m = s["m"]
            tau = s["tau32"][s["layer_id"]]
            abs_m = m.abs()
            above = abs_m > tau
            wm = w * m
            m_prev = s["m_prev"]

            def step_size(i: Tensor) -> Tensor:
                return (m[i].double() - m_prev[i].double()).abs()

            if log:
                c2i = sign != s["sign0"]
                finite = torch.isfinite(s["g"])
                margin = torch.where(flipped, -wm, wm)  # w_{t−1}·m_t
                field = (margin > tau * MARGIN_LADDER[0]).to(torch.uint8)  # ladder points exceeded (0…7)
                for k in MARGIN_LADDER[1:]:
                    field = field + (margin > tau * k).to(torch.uint8)
                counts = _counts(s, [flipped, c2i, finite, above, s["prev_above"], field])
                ints = torch.cat([counts[:, :3].to(torch.int64), _hash(s, sign)], 1)
                mean = _layer_abs_mean(s, abs_m)
                if quant:
                    v = torch.stack([_sample(s, abs_m), _sample(s, wm), _sample(s, margin)]).sort(dim=-1).values
                    q = _at_positions(v[:2], s["qpos"], s["qfrac"])
                    qm = _at_positions(v[2], s["mpos"], s["mfrac"])
                else:  # off the quantile cadence: NaN columns
                    nq, nm = s["qfrac"].shape[-1], s["mfrac"].shape[-1]
                    q, qm = s["nan_lat"][:, :nq].expand(2, -1, -1), s["nan_lat"][:, :nm]
                out["ints"] = ints
                out["floats"] = torch.cat([counts[:, 3:13], mean.unsqueeze(1), q[0], q[1], qm, s["nan_lat"]], 1)
            if ev and E > 0:
                w_prev = s["prev_w"]  # w_{t−1} as the step found it (signs changed between steps included)
                out["events"] = _events(s, flipped, lambda i: torch.stack(
                    [s["tau_e"] - (w_prev[i] * m_prev[i]).double(), step_size(i)], 1))
            if trk:
                idx = s["tsel"]
                out["tracked"] = (sign[idx], torch.stack([s["tau_t"] - wm[idx].double(), step_size(idx)], 1))
            # commit: |m_t| > τ (kept where τ is NaN), w_t·m_t and m_t for the next step
            tau64 = s["tau64"][s["layer_id"]]
            s["prev_above"].copy_(torch.where(tau64 == tau64, above, s["prev_above"]))
            s["wm_prev"].copy_(wm)
            m_prev.copy_(m)
        else:
            if log:
                c2i = sign != s["sign0"]
                finite = torch.isfinite(s["g"])
                abs_w = w.abs()
                at_clip = abs_w >= s["clip32"][s["layer_id"]]  # NaN clip (none): never
                counts = _counts(s, [flipped, c2i, finite, at_clip])
                ints = torch.cat([counts[:, :3].to(torch.int64), _hash(s, sign)], 1)
                mean = _layer_abs_mean(s, abs_w)
                q = _quantiles(_sample(s, w).abs(), s["qpos"], s["qfrac"]) if quant else \
                    s["nan_bop"][:, :s["qfrac"].shape[-1]]
                at = torch.where(s["clip_valid"].unsqueeze(1), counts[:, 3:4], _NAN)
                out["ints"] = ints
                out["floats"] = torch.cat([s["nan_bop"], mean.unsqueeze(1), q, at, s["adam"]], 1)
            prev_w = s["prev_w"]
            if ev and E > 0:
                def step_size(i: Tensor) -> Tensor:
                    return (w[i].double() - prev_w[i].double()).abs()

                if binarized:
                    out["events"] = _events(s, flipped, lambda i: torch.stack(
                        [s["prev_margin"][i].double(), step_size(i)], 1))
                else:
                    out["events"] = _events(s, flipped, lambda i: torch.stack(
                        [prev_w[i].abs().double(), step_size(i)], 1))
            if trk:
                idx = s["tsel"]
                step = (w[idx].double() - prev_w[idx].double()).abs()
                if binarized:
                    out["tracked"] = (sign[idx], torch.stack([s["margin"][idx].double(), step], 1))
                else:
                    wt = w[idx]
                    out["tracked"] = (wt >= 0, torch.stack([wt.abs().double(), step], 1))
        s["count"].add_(flipped)
        s["last"].copy_(torch.where(flipped, s["t"], s["last"]))
        return out

    return step


# Recompilations allowed per step function: one per combination of the cadence flags (log, trk, ev, quant: 16 at
# most). Dynamo's default limit (8 per code object) would be reached by a process that attaches probes to several
# models (a study) or uses unusual cadences, and fullgraph=True turns that into a failure.
RECOMPILE_LIMIT = 64
_STEP_CACHE: dict[tuple, maybe_compile] = {}


def step_fn(bop: bool, ns: list[int], n_bits: int, events: int, sign_hash: bool, has_pad: bool, binarized: bool,
            compile: bool) -> maybe_compile:
    """The (compiled) step of one group layout, shared by every probe with that layout in this process: a study's
    runs on one model compile once. Each layout gets its own copy of the step's code object, so Dynamo keeps its
    compiled graphs apart from other layouts' (a per-code-object cache)."""
    key = (bop, tuple(int(n) for n in ns), n_bits, int(events), sign_hash, has_pad, binarized, compile)
    fn = _STEP_CACHE.get(key)
    if fn is None:
        step = make_step_fn(bop, list(key[1]), n_bits, events, sign_hash, has_pad, binarized)
        step.__code__ = step.__code__.replace()  # a distinct code object per layout
        if len(_STEP_CACHE) >= 32:
            _STEP_CACHE.clear()
        fn = _STEP_CACHE[key] = maybe_compile(step, compile)
    return fn


class maybe_compile:  # noqa: N801 - used like a function
    """``torch.compile(fn, dynamic=False, fullgraph=True)``; on any failure to compile, one warning and ``fn`` eager."""

    def __init__(self, fn: Callable, compile: bool) -> None:
        self.eager = fn
        self.fn = torch.compile(fn, dynamic=False, fullgraph=True) if compile else fn
        self.compiled = compile

    def __call__(self, *args, **kwargs):
        if not self.compiled:
            return self.eager(*args, **kwargs)
        try:
            try:
                return self.fn(*args, **kwargs)
            except Exception as exc:  # Dynamo's per-code-object limit: compile this one under a higher limit
                if "RecompileLimit" not in type(exc).__name__ and "CacheSizeLimit" not in type(exc).__name__:
                    raise
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    return self.fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - compile errors surface at the first call (before any mutation)
            warnings.warn("bnn-probe: torch.compile of the probe's step failed, measuring eagerly instead "
                          f"({exc!r:.300})", RuntimeWarning, stacklevel=2)
            self.fn, self.compiled = self.eager, False
            return self.eager(*args, **kwargs)
