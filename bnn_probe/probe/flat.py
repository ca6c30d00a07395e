"""The probe's hot path: every binary layer measured at once per (device, family, dtype) group.

Two implementations of one measurement (definitions: docs/quantities.md; both are compared with the per-layer
reference ``StepContext`` + ``quantities`` in tests/test_probe_flat.py):

* **CPU: the compiled one-pass measurement** (probe/onepass.py, C in probe/_pass.c): one pass over the weights,
  m and g of every layer of the group, read in place through a table of data pointers, gives every count of the
  steps table, Σ|m| and the quantile sample; a byte of state per weight keeps the sign before the step, b(w_0),
  |m| > τ and the flip bit; the sign hash is kept incrementally.
* **CUDA (and the CPU when the extension is not installed): the pure-torch step** of probe/fused.py, eager or
  ``torch.compile``-d, on flat concatenations of the group's tensors. Per-layer counts come from a bit code per
  weight (one bit per mask; the margin ladder as one 3-bit field, the number 0…7 of ladder points k·τ its margin
  w_{t−1}·m_t exceeds — #{margin > k_j·τ} = #{field > j}), ``layer · 2^B + code`` histogrammed by ``histc`` and one
  matrix product; ``sign_hash`` by one int64 ``cumsum`` differenced at the layer ends; no host synchronisation.

τ, γ, clip values and the like are read from the param groups every step (host floats) and turned into device
vectors / the compiled pass's arrays only when a value changes.

Binarizer stage (probe/binarizers.py): every sign above is b(w), the layer's binarizer, computed by
:meth:`FlatGroup.binarize` (after the step, before it, and at attach) before anything is counted; latent inertia
comes from :meth:`FlatGroup.margin`. With bnn-probe's sign for every layer of a group (``any_custom`` False) the
stage is the comparison ``w ≥ 0`` inside the pass / the step; otherwise the signs enter as an input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import BnnProbeError
from ..runlog.schema import MARGIN_EXCEED, MARGIN_LADDER, MARGIN_Q, MARGIN_QUANTILES
from . import onepass
from .binary_detect import LayerInfo, clip_value_of
from .context import hash_coefficients, normalize_2nd
from .cuda_graph import StepGraphs
from .fused import _at_positions, step_fn
from .quantities import QUANTILES

__all__ = ["FlatGroup", "group_layers"]

_NAN = float("nan")
# bit codes of the per-weight masks (Bop family / latent)
_BOP_BITS = ("flipped", "c2i", "finite", "above", "prev_above", "l0", "l1", "l2")  # l0..l2: the margin ladder field
_LAT_BITS = ("flipped", "c2i", "finite", "at_clip")


def _count_matrix(bits: Sequence[str], columns: dict[str, callable]) -> Tensor:
    """[2^B, C] float64: column c is 1 at the codes where the predicate ``columns[c](bits of code)`` holds."""
    nb = 1 << len(bits)
    rows = []
    for code in range(nb):
        b = {name: bool(code >> k & 1) for k, name in enumerate(bits)}
        rows.append([1.0 if f(b) else 0.0 for f in columns.values()])
    return torch.tensor(rows, dtype=torch.float64)


_BOP_COUNTS = {
    "flips": lambda b: b["flipped"],
    "c2i_diff": lambda b: b["c2i"],
    "nonfinite_grads": lambda b: not b["finite"],
    "above_threshold": lambda b: b["above"],
    "crossings_up": lambda b: b["above"] and not b["prev_above"],
    "crossings_down": lambda b: b["prev_above"] and not b["above"],
    # the margin w_{t−1}·m_t exceeds the j-th ladder point iff the field (number of points exceeded) is > j
    **{c: (lambda b, j=j: b["l0"] + 2 * b["l1"] + 4 * b["l2"] > j) for j, c in enumerate(MARGIN_EXCEED)},
}
_LAT_COUNTS = {
    "flips": lambda b: b["flipped"],
    "c2i_diff": lambda b: b["c2i"],
    "nonfinite_grads": lambda b: not b["finite"],
    "at_clip": lambda b: b["at_clip"],
}


def _flat(t: Tensor) -> Tensor:
    t = t.detach()
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


class _Views:
    """Flat views of a list of tensors, reused while every tensor keeps its storage (checked by ``data_ptr`` each
    call: a parameter whose ``.data`` was replaced, or a reloaded optimizer state, gets a fresh view). A cached view
    keeps its storage alive, so an equal pointer means the same storage. Non-contiguous tensors are reshaped (copied)
    at every call."""

    def __init__(self) -> None:
        self.key: list | None = None
        self.views: list[Tensor] = []
        self.fixed = True

    def get(self, ts: list[Tensor]) -> list[Tensor]:
        key = [t.data_ptr() for t in ts]
        if key != self.key or not self.fixed:
            self.views = [_flat(t) for t in ts]
            self.fixed = all(t.is_contiguous() for t in ts)
            self.key = key
        return self.views


_PLAIN = (float, int, bool, type(None))


def plain_values(values: tuple) -> bool:
    """True when every value is an immutable Python number or None: a param group's raw hyperparameters may then be
    compared with last step's to skip re-reading them (a tensor could change in place and compare equal to itself)."""
    return all(type(v) in _PLAIN for v in values)


_NP_CMP = {"ge": np.greater_equal, "gt": np.greater, "lt": np.less}
_NP_FLOATS = (torch.float32, torch.float64)


def _np_ok(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _NP_FLOATS


def _cmp(op: str, x: Tensor, s: float | Tensor, out: Tensor | None = None) -> Tensor:
    """``torch.<op>(x, s)`` → bool. On CPU through numpy (SIMD; torch 2.13's CPU compare-to-bool kernels are ~20x
    slower): same IEEE comparison in x's dtype (a Python scalar is rounded to that dtype first, as torch does)."""
    if _np_ok(x) and (not isinstance(s, Tensor) or s.dtype == x.dtype):
        if out is None:
            out = torch.empty(x.shape, dtype=torch.bool)
        xn = x.numpy()
        _NP_CMP[op](xn, s.numpy() if isinstance(s, Tensor) else xn.dtype.type(s), out=out.numpy())
        return out
    fn = getattr(torch, op)
    return fn(x, s) if out is None else fn(x, s, out=out)


def _to_dev(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host list as a device tensor without a host synchronisation (pinned, non-blocking on CUDA)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def group_layers(layers: list[LayerInfo]) -> list[list[int]]:
    """Layer indices grouped by (device, family, dtype, momentum key), each group in layer order."""
    groups: dict[tuple, list[int]] = {}
    for i, ly in enumerate(layers):
        groups.setdefault((str(ly.param.device), ly.family, ly.param.dtype, ly.extra.get("momentum_key")),
                          []).append(i)
    return list(groups.values())


class FlatGroup:
    """Flat device state and the vectorised per-step measurement of a group of layers of one family."""

    gen_shared = True  # its event generator (``gen``) has other users: no drawing ahead (set by the probe)

    def __init__(self, layers: list[LayerInfo], rows: list[int], q_idx: list[Tensor | None], t_idx: list[Tensor],
                 probed: torch.optim.Optimizer, sign_hash: bool, events_per_layer: int,
                 float_columns: Sequence[str], device_path: bool | None = None, compile_probe: bool = False,
                 cuda_graphs: bool | None = None) -> None:
        """``device_path``: measure with the pure-torch step of probe/fused.py (None: on any device but the CPU;
        True also on the CPU, for tests); ``compile_probe``: ``torch.compile`` that step (implies the device path);
        ``cuda_graphs``: replay the device path's step as a CUDA graph (probe/cuda_graph.py; None: on CUDA; True on
        another device runs the same staging and packing without a graph, for tests)."""
        self.layers, self.rows, self.probed = layers, rows, probed
        self.family = layers[0].family
        self.bop = self.family != "latent"
        p0 = layers[0].param
        self.device, self.dtype = p0.device, p0.dtype
        # the compiled CPU pass's float type (None: not a CPU float32/float64 group, which it does not measure)
        self.np_dtype = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}.get(self.dtype) \
            if self.device.type == "cpu" else None
        dev = self.device
        self.ns = [ly.n for ly in layers]
        self.L, self.N = len(layers), sum(self.ns)
        offs = [0]
        for n in self.ns:
            offs.append(offs[-1] + n)
        self.offsets = offs[:-1]
        self.lengths = torch.tensor(self.ns, dtype=torch.int64, device=dev)
        self.n_f = self.lengths.to(torch.float64)
        self.starts = torch.tensor(self.offsets, dtype=torch.int64, device=dev)
        self.ends = self.starts + self.lengths - 1
        self.bounds = torch.cat([self.starts, self.ends + 1])  # into a zero-prepended cumsum: [starts | ends + 1]
        self._pv, self._mv, self._vv = _Views(), _Views(), _Views()
        # where the Bop family keeps m and τ, γ (third-party optimizers: attach(..., momentum_key=...))
        self.mkey = layers[0].extra.get("momentum_key", "exp_avg")
        self.tkeys = [ly.extra.get("threshold_key", "threshold") for ly in layers]
        self.gkeys = [ly.extra.get("gamma_key", "gamma") for ly in layers]
        self.layer_id = torch.repeat_interleave(torch.arange(self.L), torch.tensor(self.ns)).to(dev)
        self.bits = _BOP_BITS if self.bop else _LAT_BITS
        self.NB = 1 << len(self.bits)
        counts = _BOP_COUNTS if self.bop else _LAT_COUNTS
        self.count_cols = list(counts)
        self.count_mat = _count_matrix(self.bits, counts).to(dev)
        self.use_histc = dev.type != "cpu"
        big = max(self.ns) >= 2**24 or self.L * self.NB >= 2**24
        if self.use_histc:
            self.code_base = (self.layer_id * self.NB).to(torch.float64 if big else torch.float32)
        else:
            self.code_base = (self.layer_id * self.NB).to(torch.int32 if self.L * self.NB < 2**31 else torch.int64)
        self.code = torch.empty(self.N, dtype=torch.uint8, device=dev)
        # the compiled one-pass measurement on CPU (probe/onepass.py); otherwise the pure-torch step of fused.py
        self.onepass_ok = not compile_probe and not device_path and onepass.usable(layers, self.dtype, dev)
        self.onepass: onepass.OnePass | None = None
        self.fused = not self.onepass_ok
        self.code_base_f = (self.layer_id * self.NB).to(torch.float64 if big else torch.float32) + 0.5
        self.layer_ends = [o + n for o, n in zip(self.offsets, self.ns, strict=True)]
        self.sign_hash = sign_hash
        self.E = int(events_per_layer)
        # float columns: Bop family writes the first 25, latent the last 9 (checked against the recorder's order)
        fc = list(float_columns)
        self.n_float = len(fc)
        bop_cols = ["above_threshold", "crossings_up", "crossings_down", *MARGIN_EXCEED, "abs_m_mean",
                    *[f"abs_m_q{round(q * 100):02d}" for q in QUANTILES],
                    *[f"wm_q{round(q * 100):02d}" for q in QUANTILES], *MARGIN_Q]
        lat_cols = ["abs_w_mean", *[f"abs_w_q{round(q * 100):02d}" for q in QUANTILES], "at_clip", "adam_step_q50",
                    "adam_step_q95"]
        if fc != bop_cols + lat_cols:  # pragma: no cover - schema and probe out of step
            raise RuntimeError(f"steps float columns changed: {fc}")
        self.n_bop_cols, self.n_lat_cols = len(bop_cols), len(lat_cols)
        # buffers
        w = self.cat_w()
        self.wbuf = w.clone() if self.N else w
        self._setup_binarizers()
        self.sign0 = self.binarize(w)
        self.prev_sign = self.sign0.clone()
        self.sign = torch.empty_like(self.sign0)
        self.flipped = torch.empty_like(self.sign0)
        self.c2ibuf = torch.empty_like(self.sign0)
        self.prev_w = w.clone() if self.fused else None
        self.count = torch.zeros(self.N, dtype=torch.int32, device=dev)
        self.last = torch.zeros(self.N, dtype=torch.int32, device=dev)
        self.mix = torch.cat([hash_coefficients(n, dev) for n in self.ns]) if sign_hash else None
        self.hbuf = torch.zeros(self.N + 1, dtype=torch.int64, device=dev) if sign_hash else None
        self.cbuf = torch.zeros(self.N + 1, dtype=torch.int32, device=dev)
        self.ev_j = torch.arange(self.E, device=dev, dtype=torch.float64)
        self.ev_j1 = self.ev_j + 1
        self.ev_layer = torch.arange(self.L, device=dev).repeat_interleave(self.E)
        self.missing_hash = torch.full((self.L, 1), -(2**63), dtype=torch.int64, device=dev)
        self.nan_bop = torch.full((self.L, self.n_bop_cols), _NAN, dtype=torch.float64, device=dev)
        self.nan_lat = torch.full((self.L, self.n_lat_cols), _NAN, dtype=torch.float64, device=dev)
        self._zeros: dict[int, Tensor] = {}
        self._bufs: dict[str, Tensor] = {}
        self._flip = 0
        self.set_samples(q_idx, t_idx)
        self.adam = [isinstance(ly.optimizer, (torch.optim.Adam, torch.optim.AdamW)) for ly in layers]
        self.prev_above: Tensor | None = None
        self.wm_prev: Tensor | None = None
        self.m_prev: Tensor | None = None  # m_{t−1} (Bop2ndOrder: m̂_{t−1}) for step_size
        if self.bop:
            self._read_hyper()
            m = self.cat_m()
            above = self._above(m.abs())
            for li, ly in enumerate(layers):
                if self.mkey not in ly.optimizer.state.get(ly.param, {}):
                    above[self.offsets[li]:self.offsets[li] + self.ns[li]] = False
            self.prev_above = above
            self.wm_prev = w * m  # w_{t−1}·m_{t−1} for the next step's flip events (the state at attach)
            self.m_prev = m.clone()
        if self.onepass_ok:  # the compiled pass keeps sign0, |m| > τ, m_{t−1}, w_{t−1}·m_{t−1} in its own buffers
            self.onepass = onepass.OnePass(self, w, self.sign0, self.prev_above, self.m_prev)
            if self.bop:
                self.onepass.set_hyper(self.hyper_np)
            self.prev_sign = self.sign = self.flipped = self.c2ibuf = None
            self.prev_above = self.wm_prev = self.m_prev = None
            self.code = self.code_base = self.code_base_f = self.hbuf = self.cbuf = None  # the device path's
        if self.fused:
            self.t_dev = torch.zeros((), dtype=torch.int32, device=dev)
            self.u0 = torch.zeros(self.L, self.E, dtype=torch.float64, device=dev)
            self.compile_probe = bool(compile_probe)
            self._step = step_fn(self.bop, self.ns, len(self.bits), self.E, sign_hash, True, self.any_custom,
                                 self.compile_probe)
            # fixed-address inputs (a CUDA graph reads them where it captured them)
            self._buf("g", self.dtype)
            self._buf("m", self.dtype)
            self.adam_buf = self.nan_lat[:, :2].clone()
        use_graphs = self.fused and not self.any_custom and (dev.type == "cuda" if cuda_graphs is None
                                                             else bool(cuda_graphs))
        self.graphs = StepGraphs(dev) if use_graphs else None

    # ------------------------------------------------------------------ binarizer stage
    def _setup_binarizers(self) -> None:
        """Each layer's binarizer b(w) (probe/binarizers.py). With bnn-probe's sign everywhere the stage is one
        comparison of the flat group (the fast path, bit-identical to a probe without binarizers); otherwise each
        layer whose binarizer differs is binarized on its own view in the parameter's shape."""
        self.binarizers = [ly.binarizer for ly in self.layers]
        self.custom = [not b.is_default for b in self.binarizers]
        self.any_custom = any(self.custom)
        self.shapes = [ly.param.shape for ly in self.layers]

    def binarize(self, w: Tensor, out: Tensor | None = None) -> Tensor:
        """bool [b(w) = +1] of a flat group tensor (w_t, w_{t−1} or w_0), layer by layer through the binarizers."""
        if not self.any_custom:
            return _cmp("ge", w, 0.0, out)
        if out is None:
            out = torch.empty(w.shape, dtype=torch.bool, device=w.device)
        for li, b in enumerate(self.binarizers):
            o, n = self.offsets[li], self.ns[li]
            if self.custom[li]:
                out[o:o + n] = b.positive(w[o:o + n].view(self.shapes[li])).reshape(-1)
            else:
                _cmp("ge", w[o:o + n], 0.0, out[o:o + n])
        return out

    def margin(self, w: Tensor) -> Tensor:
        """Latent inertia of every weight of a flat group tensor: |w| (sign), or the binarizer's margin."""
        if not self.any_custom:
            return w.abs()
        return torch.cat([b.margin(w[o:o + n].view(s)).reshape(-1) if c else w[o:o + n].abs() for b, c, o, n, s in
                          zip(self.binarizers, self.custom, self.offsets, self.ns, self.shapes, strict=True)])

    # ------------------------------------------------------------------ samples
    def set_samples(self, q_idx: list[Tensor | None], t_idx: list[Tensor]) -> None:
        """Fixed quantile samples (None = all weights) and tracked weights, per layer (flat indices)."""
        dev = self.device
        self.q_idx = [None if q is None else q.to(dev) for q in q_idx]
        self.t_idx = [t.to(dev) for t in t_idx]
        ks = [self.ns[i] if q is None else len(q) for i, q in enumerate(q_idx)]
        K = max(ks) if ks else 0
        sel = torch.zeros(self.L, K, dtype=torch.int64)
        pad = torch.zeros(self.L, K, dtype=torch.bool)
        for li, q in enumerate(q_idx):
            idx = torch.arange(self.ns[li]) if q is None else q.cpu()
            sel[li, :len(idx)] = idx + self.offsets[li]
            pad[li, len(idx):] = True
        self.qsel = sel.to(dev)
        self.qpad_t = pad.to(dev)  # the device path masks always (static graph)
        self.qpos, self.qfrac = self._positions(ks, QUANTILES)
        self.apos, self.afrac = self._positions(ks, (0.5, 0.95))
        self.mpos, self.mfrac = self._positions(ks, MARGIN_QUANTILES)
        self.tsel = torch.cat([t.cpu() + o for t, o in zip(t_idx, self.offsets, strict=True)]).to(dev)
        self.t_layer = torch.cat([torch.full((len(t),), li, dtype=torch.int64) for li, t in enumerate(t_idx)]).to(dev)
        self.t_sizes = [len(t) for t in t_idx]
        self._hyper_key = None  # τ of the tracked weights is cached with the hyperparameters
        self._hyper_raw: tuple | None = None
        if dev.type == "cpu":  # the compiled pass's view: per-layer sample indices (in the layer), padded
            self.qk = K
            self.qks = np.asarray(ks, dtype=np.int64)
            self.qidx_np = np.ascontiguousarray((sel - torch.tensor(self.offsets, dtype=torch.int64)[:, None])
                                                .clamp_min(0).numpy())
            self.qpos_np, self.qfrac_np = self.qpos.numpy(), self.qfrac.numpy()
            self.mpos_np, self.mfrac_np = self.mpos.numpy(), self.mfrac.numpy()
            self.tsel_np = self.tsel.numpy()
            if getattr(self, "onepass", None) is not None:
                self.onepass.set_samples()

    def _positions(self, ks: list[int], qs: tuple[float, ...]) -> tuple[Tensor, Tensor]:
        """numpy-"linear" positions: [L, 2Q] (lo then hi indices into each sorted row) and [L, Q] fractions."""
        lo_hi, frac = [], []
        for k in ks:
            pos = torch.tensor(qs, dtype=torch.float64) * max(k - 1, 0)
            lo = pos.floor()
            lo_hi.append(torch.cat([lo, pos.ceil()]).long())
            frac.append(pos - lo)
        return torch.stack(lo_hi).to(self.device), torch.stack(frac).to(self.device)

    def _quantiles(self, x: Tensor, pos: Tensor, frac: Tensor) -> Tensor:
        """x: [..., L, K] samples (NaN-padded) → [..., L, Q] quantiles (float64), one sort for all rows."""
        return _at_positions(self._sort(x), pos, frac)

    @staticmethod
    def _sort(x: Tensor) -> Tensor:
        if x.device.type == "cpu":  # numpy's (SIMD) sort is ~30x faster than torch.sort on CPU here; same order
            return torch.from_numpy(np.sort(x.numpy(), axis=-1))
        return x.sort(dim=-1).values

    def _sample_layers(self, xs: list[Tensor]) -> Tensor:
        """[L, K]: the quantile sample of per-layer flat tensors, gathered layer by layer (no concatenated copy of
        the group), NaN past each layer's sample."""
        out = torch.full(self.qsel.shape, _NAN, dtype=xs[0].dtype, device=xs[0].device)
        for li, x in enumerate(xs):
            q = self.q_idx[li]
            if q is None:
                out[li, :self.ns[li]] = x
            else:
                torch.index_select(x, 0, q, out=out[li, :len(q)])
        return out

    # ------------------------------------------------------------------ flat views
    def cat_w(self, out: Tensor | None = None) -> Tensor:
        views = self._pv.get([ly.param for ly in self.layers])
        return torch.cat(views, out=out) if out is not None else torch.cat(views)

    def _zeros_like_layer(self, li: int) -> Tensor:
        z = self._zeros.get(li)
        if z is None:
            z = self._zeros[li] = torch.zeros(self.ns[li], dtype=self.dtype, device=self.device)
        return z

    def _state_views(self, key: str) -> tuple[list[Tensor], list[int]]:
        ts, missing = [], []
        for li, ly in enumerate(self.layers):
            st = ly.optimizer.state.get(ly.param)
            t = st.get(key) if st else None
            if t is None:
                missing.append(li)
                ts.append(self._zeros_like_layer(li))
            else:
                ts.append(t)
        cache = self._mv if key in ("exp_avg", self.mkey) else self._vv
        return cache.get(ts), missing

    def cat_m(self) -> Tensor:
        """m_t (Bop) or m̂_t (Bop2ndOrder) of every layer, flat (zeros for a layer without optimizer state)."""
        ms = self._m_views()
        if self.family != "bop2nd":
            buf = self._buf("m", self.dtype)  # two buffers in turn: the other one holds m_{t−1} (step_size)
            if self.m_prev is buf:
                buf = self._buf("m_alt", self.dtype)
            return torch.cat(ms, out=buf)
        vs, _ = self._state_views("exp_avg_sq")
        if any(ly.group.get("adam_bias_correction") for ly in self.layers):  # divisors kept in the optimizer state
            out = torch.cat([normalize_2nd(m, v, ly.group, ly.optimizer.state.get(ly.param))
                             for m, v, ly in zip(ms, vs, self.layers, strict=True)])
        elif self._uniform_2nd is not None:
            gamma, sigma, eps, bc = self._uniform_2nd
            group = {"gamma": gamma, "sigma": sigma, "eps": eps, "bias_correction": bc}
            out = normalize_2nd(torch.cat(ms), torch.cat(vs), group)
        else:
            out = torch.cat([normalize_2nd(m, v, ly.group) for m, v, ly in zip(ms, vs, self.layers, strict=True)])
        if self.m_missing:
            for li in self.m_missing:
                out[self.offsets[li]:self.offsets[li] + self.ns[li]] = 0
        return out

    def _m_views(self) -> list[Tensor]:
        """Flat views of every layer's optimizer state under the momentum key (zeros where a layer has none yet;
        ``m_missing`` lists those layers; a stepped layer without the key is an error)."""
        ms, missing = self._state_views(self.mkey)
        self.m_missing = missing
        self._check_momentum(missing)
        return ms

    def _check_momentum(self, missing: list[int]) -> None:
        for li in missing:
            st = self.layers[li].optimizer.state.get(self.layers[li].param)
            if st:  # stepped, but m is not where the probe was told to read it: an error, never silent zeros
                ly = self.layers[li]
                raise BnnProbeError(
                    f"the optimizer state of {ly.name} ({type(ly.optimizer).__name__}) has no momentum key "
                    f"{self.mkey!r} (keys: {', '.join(map(str, st))}); attach(..., momentum_key=...) names it")

    def cat_g(self) -> Tensor:
        views = []
        self.g_missing = []
        for li, ly in enumerate(self.layers):
            g = ly.param.grad
            if g is None:
                self.g_missing.append(li)
                views.append(self._zeros_like_layer(li))
            else:
                views.append(_flat(g))
        return torch.cat(views, out=self._buf("g", self.dtype))

    def _buf(self, name: str, dtype: torch.dtype) -> Tensor:
        """A preallocated flat buffer (large fresh allocations cost page faults on CPU every step)."""
        b = self._bufs.get(name)
        if b is None:
            b = self._bufs[name] = torch.empty(self.N, dtype=dtype, device=self.device)
        return b

    # ------------------------------------------------------------------ hyperparameters
    def _read_hyper(self) -> None:
        """Read τ (γ, σ, eps, clip …) from the groups; rebuild device vectors only when a value changed."""
        groups = [ly.group for ly in self.layers]
        if self.bop:
            # the every-step check: the raw values, trusted when they are plain numbers (plain_values)
            raw = tuple(g.get(k) for g, tk, gk in zip(groups, self.tkeys, self.gkeys, strict=True)
                        for k in (tk, gk, "sigma", "eps", "bias_correction"))
            if raw == self._hyper_raw and self._hyper_key is not None:
                return
            self._hyper_raw = raw if plain_values(raw) else None
            key = tuple((float(g.get(tk, _NAN)), float(g.get(gk, _NAN)), float(g.get("sigma", _NAN)),
                         float(g.get("eps", 1e-10)), bool(g.get("bias_correction", False)))
                        for g, tk, gk in zip(groups, self.tkeys, self.gkeys, strict=True))
        else:
            key = tuple(clip_value_of(self.probed, ly.optimizer) for ly in self.layers)
        if key == self._hyper_key:
            return
        self._hyper_key = key
        dev = self.device
        if self.bop:
            taus = [k[0] for k in key]
            self._dev_vec("tau_l", taus, torch.float64)  # for inertia τ − w·m (float64, like the reference)
            self._dev_vec("tau32_l", taus, self.dtype)  # per layer, in the weights' dtype (device path)
            self._dev_gather("tau_t", self.t_layer)
            self._dev_gather("tau_e", self.ev_layer)
            self.tau_nan = any(t != t for t in taus)
            if len(set(taus)) == 1 and not self.tau_nan:
                self.tau, self.ntau = taus[0], -taus[0]
            else:
                t32 = _to_dev(taus, self.dtype, dev)
                self.tau = t32[self.layer_id]
                self.ntau = -self.tau
            self.tau_valid = None if not self.tau_nan else \
                _to_dev([t == t for t in taus], torch.bool, dev)[self.layer_id]
            self.tau_pos = [t > 0 for t in taus]
            if self.np_dtype is not None:  # the compiled pass: τ_l and the ladder points k·τ_l in the weights' dtype
                npd = self.np_dtype
                ladder = [sorted(npd.type(k * t) for k in MARGIN_LADDER) for t in taus]  # ascending (see _pass.c)
                self.hyper_np = {"tau": np.asarray(taus, dtype=npd), "thr": np.asarray(ladder, dtype=npd).reshape(-1),
                                 "tau_valid": np.asarray([t == t for t in taus], dtype=np.uint8)}
                self.tau_t_np, self.tau_l_np = self.tau_t.numpy(), self.tau_l.numpy()
                if self.onepass is not None:
                    self.onepass.set_hyper(self.hyper_np)
            self._uniform_2nd = key[0][1:] if len({k[1:] for k in key}) == 1 else None
        else:
            clips = [math.nan if c is None else float(c) for c in key]
            self.clip_any = any(c is not None for c in key)
            self.clip_none_rows = [li for li, c in enumerate(key) if c is None]
            self._dev_vec("clip32_l", clips, self.dtype)
            self._dev_vec("clip_valid_l", [c is not None for c in key], torch.bool)
            if self.np_dtype is not None:
                self.hyper_np = {"clip": np.asarray(clips, dtype=self.np_dtype),
                                 "clip_valid": np.asarray([c is not None for c in key], dtype=np.uint8)}
                if self.onepass is not None:
                    self.onepass.set_hyper(self.hyper_np)
            if len(set(key)) == 1:
                self.clip = clips[0]
            else:
                self.clip = _to_dev(clips, self.dtype, dev)[self.layer_id]

    def _dev_vec(self, name: str, values: list, dtype: torch.dtype) -> None:
        """``self.<name>`` = the values as a device vector; on the device path written into the existing tensor (a
        captured CUDA graph reads it at its address: a new τ must not need a new graph)."""
        new = _to_dev(values, dtype, self.device)
        old = self.__dict__.get(name)
        if self.fused and old is not None and old.shape == new.shape and old.dtype == dtype:
            old.copy_(new)
        else:
            setattr(self, name, new)

    def _dev_gather(self, name: str, index: Tensor) -> None:
        """``self.<name>`` = ``tau_l[index]``, in place on the device path (see :meth:`_dev_vec`)."""
        old = self.__dict__.get(name)
        if self.fused and old is not None and old.shape == index.shape:
            torch.index_select(self.tau_l, 0, index, out=old)
        else:
            setattr(self, name, self.tau_l[index])

    def _above(self, abs_m: Tensor, out: Tensor | None = None) -> Tensor:
        return _cmp("gt", abs_m, self.tau, out)

    # ------------------------------------------------------------------ per step
    def before_step(self, t: int, quant: bool, tail: int = 0) -> None:
        """Pre-step hook of step ``t`` (``quant``: its quantile sample is logged; ``tail``: its flip events (bit 0)
        and tracked weights (bit 1) are): b(w_{t−1}) into the compiled pass's state (CPU; or a request to measure
        inside bnn_probe's Bop), or w_{t−1} copied (device path)."""
        if self.onepass is not None:
            self.onepass.pre(t, quant, tail)
        else:
            self.cat_w(out=self.prev_w)

    def keep_weights(self) -> None:
        """Copy w_t into ``wbuf`` (the run checks compare it with the weights before the next step). The device path
        refreshes ``wbuf`` every step anyway; the compiled pass reads the weights in place and copies only here."""
        if self.onepass is not None:
            self.cat_w(out=self.wbuf)

    def measure(self, t: int, log: bool, trk: bool, ev: bool, hist: bool, snap: bool, quant: bool = True) -> dict:
        """Everything of step t for this group (rows in group order); updates the counters. ``quant``: the steps
        rows' quantile columns are computed (else NaN)."""
        if self.fused:
            return self._measure_fused(t, log, trk, ev, hist, snap, quant)
        op = self.onepass
        if not op.served:  # (a measurement inside the optimizer's step read them already)
            self._read_hyper()
        op.post(t, ev, trk, log and quant)
        out: dict = {}
        if log:
            out["ints"], out["floats"] = op.steps(quant)
        if ev and self.E > 0:
            out["events"] = op.events()
        if trk:
            out["tracked"] = op.tracked()
        if hist:
            out["hists"] = op.hists()
        if snap:
            out["snap"] = torch.from_numpy(op.sign_now().copy())
        return out

    def _measure_fused(self, t: int, log: bool, trk: bool, ev: bool, hist: bool, snap: bool,
                       quant: bool = True) -> dict:
        """The device path: flat cats, then the pure step of probe/fused.py (eager or compiled), which updates
        counters, last-flip steps, |m| > τ and w·m in place — replayed as one CUDA graph with the cats and the
        histograms when ``self.graphs`` is set (probe/cuda_graph.py); otherwise histograms eagerly; snapshots (rare,
        one comparison) eagerly."""
        self._read_hyper()
        s = self._fused_inputs()
        ev = ev and self.E > 0
        if log:
            s["g"] = self.cat_g()
            if not self.bop:
                s["adam"] = self._adam_step() if quant else self.nan_lat[:, :2]
        self.t_dev.fill_(t)
        if ev:
            s["u"] = torch.rand(self.L, self.E, generator=self.gen, device=self.device, dtype=torch.float64,
                                out=self.u0)
        if self.graphs is not None:  # the histograms (when due) inside the same graph
            out = self._measure_graphed(s, log, trk, ev, quant, hist)
            w, m, hist = s["w"], s.get("m"), False
        else:
            w = s["w"] = self.cat_w(out=self.wbuf)
            m = None
            if self.bop:
                m = s["m"] = self.cat_m()
            if self.any_custom:  # the binarizer stage runs eagerly; the fused step gets its signs (latent margins)
                s["sign"], s["prev_sign"] = self.binarize(w), self.binarize(self.prev_w)
                if not self.bop:
                    s["margin"], s["prev_margin"] = self.margin(w), self.margin(self.prev_w)
            out = self._step(s, log, trk, ev, quant)
        if hist:
            out["hists"] = self._hists(w, w * m if self.bop else None, m.abs() if self.bop else None)
        if snap:
            out["snap"] = s["sign"].clone() if self.any_custom else w >= 0
        return out

    def _measure_graphed(self, s: dict, log: bool, trk: bool, ev: bool, quant: bool, hist: bool) -> dict:
        """The step with the concatenations of w_t (and m_t), and on histogram steps the histograms, inside one
        captured graph (probe/cuda_graph.py). Every input sits at a fixed address; the key holds their pointers (a
        moved parameter or state: a new graph) and, on histogram steps, which layers have τ > 0 (their rows)."""
        if not self.bop and log and s["adam"] is not self.adam_buf:  # computed eagerly: into its fixed buffer
            self.adam_buf.copy_(s["adam"])
            s["adam"] = self.adam_buf
        wviews = self._pv.get([ly.param for ly in self.layers])
        mviews = None
        m_in_graph = self.family == "bop"
        if self.bop:
            mbuf = self._bufs["m"]
            if m_in_graph:
                mviews = self._m_views()
            else:  # Bop2ndOrder's normalisation reads host numbers: eagerly, into the fixed buffer
                mbuf.copy_(self.cat_m())
            s["m"] = mbuf
        ptrs = (tuple(v.data_ptr() for v in s.values()), tuple(self._pv.key or ()),
                tuple(self._mv.key or ()) if m_in_graph else ())

        def step() -> dict:
            torch.cat(wviews, out=self.wbuf)
            if mviews is not None:
                torch.cat(mviews, out=mbuf)
            out = self._step(s, log, trk, ev, quant)
            if hist:
                w = self.wbuf
                tau = self.tau32_l[self.layer_id] if self.bop else None
                for q, (cnt, stats, _) in self._hists(w, w * mbuf if self.bop else None,
                                                      mbuf.abs() if self.bop else None, tau).items():
                    out[f"hist_counts:{q}"], out[f"hist_stats:{q}"] = cnt, stats
            return out

        flags = (log, trk, ev, quant, hist, tuple(self.tau_pos) if hist and self.bop else ())
        out = self.graphs.run(flags, ptrs, step)
        if hist:
            out["hists"] = {q: (out.pop(f"hist_counts:{q}"), out.pop(f"hist_stats:{q}"), rows)
                            for q, rows in self._hist_rows().items()}
        return out

    def _hist_rows(self) -> dict[str, list[int]]:
        """The histogram quantities of this group, in order, each with the layer rows that have it (τ > 0 for the
        relative ones): what :meth:`_hists` computes."""
        allrows = list(range(self.L))
        if not self.bop:
            return {"abs_w": allrows}
        pos = [li for li in allrows if self.tau_pos[li]]
        return {**({"abs_m_rel": pos, "wm_rel": pos} if pos else {}), "abs_m": allrows}

    def _fused_inputs(self) -> dict:
        """The tensors of the fused step, with the same keys every step (a stable graph signature)."""
        s = {"w": self.wbuf, "prev_w": self.prev_w, "g": self._bufs["g"], "u": self.u0, "t": self.t_dev,
             "sign0": self.sign0,
             "count": self.count, "last": self.last, "layer_id": self.layer_id, "code_base": self.code_base_f,
             "count_mat": self.count_mat, "bounds": self.bounds, "starts": self.starts, "n_f": self.n_f,
             "qsel": self.qsel, "qpad": self.qpad_t, "qpos": self.qpos, "qfrac": self.qfrac, "tsel": self.tsel,
             "ev_j": self.ev_j, "ev_j1": self.ev_j1, "missing_hash": self.missing_hash}
        if self.sign_hash:
            s["mix"] = self.mix
        if self.bop:
            s.update(m=self._bufs["m"], tau32=self.tau32_l, tau64=self.tau_l, tau_t=self.tau_t, tau_e=self.tau_e,
                     prev_above=self.prev_above, wm_prev=self.wm_prev, m_prev=self.m_prev, nan_lat=self.nan_lat,
                     mpos=self.mpos, mfrac=self.mfrac)
        else:
            s.update(clip32=self.clip32_l, clip_valid=self.clip_valid_l, nan_bop=self.nan_bop,
                     adam=self.adam_buf)
        return s

    def _adam_step(self) -> Tensor:
        """[L, 2] quantiles (0.5, 0.95) of |m̂/(sqrt(v̂)+eps)| on the sample; NaN where not Adam / no state yet."""
        if not any(self.adam):
            return self.nan_lat[:, :2]
        ms, missing = self._state_views("exp_avg")
        vs, _ = self._state_views("exp_avg_sq")
        b1s, b2s, epss, steps = [], [], [], []
        dev_steps = False
        for li, ly in enumerate(self.layers):
            g = ly.group
            b1, b2 = g["betas"] if self.adam[li] else (0.0, 0.0)
            b1s.append(float(b1))
            b2s.append(float(b2))
            epss.append(float(g.get("eps", 0.0)))
            st = ly.optimizer.state.get(ly.param, {})
            k = st.get("step", 1.0)
            if isinstance(k, Tensor) and k.device.type != "cpu":
                dev_steps = True
            steps.append(k)
        dev = self.device
        if dev.type == "cpu" and not dev_steps:  # a few numpy ops per layer (the same float64 arithmetic)
            return self._adam_step_cpu(ms, vs, missing, b1s, b2s, epss, [float(s) for s in steps])
        if dev_steps:
            k = torch.stack([s.to(dev, torch.float64).reshape(()) if isinstance(s, Tensor)
                             else torch.tensor(float(s), dtype=torch.float64, device=dev) for s in steps])
            bc1 = 1 - _to_dev(b1s, torch.float64, dev) ** k
            bc2 = 1 - _to_dev(b2s, torch.float64, dev) ** k
        else:
            kf = [float(s) for s in steps]
            bc1 = _to_dev([1 - b ** k for b, k in zip(b1s, kf, strict=True)], torch.float64, dev)
            bc2 = _to_dev([1 - b ** k for b, k in zip(b2s, kf, strict=True)], torch.float64, dev)
        eps = _to_dev(epss, torch.float64, dev)
        mm = self._sample_layers(ms).double() / bc1.unsqueeze(1)
        vv = self._sample_layers(vs).double() / bc2.unsqueeze(1)
        u = (mm / (vv.sqrt() + eps.unsqueeze(1))).abs()
        out = self._quantiles(u, self.apos, self.afrac)
        bad = sorted(set(missing) | {li for li, a in enumerate(self.adam) if not a})
        if bad:
            out[bad] = _NAN
        return out

    def _adam_step_cpu(self, ms: list[Tensor], vs: list[Tensor], missing: list[int], b1s: list[float],
                       b2s: list[float], epss: list[float], ks: list[float]) -> Tensor:
        """:meth:`_adam_step` on CPU tensors, layer by layer in numpy."""
        out = np.full((self.L, 2), _NAN)
        pos, frac = self.apos.numpy(), self.afrac.numpy()
        for li in range(self.L):
            if not self.adam[li] or li in missing:
                continue
            m, v = ms[li].detach().numpy(), vs[li].detach().numpy()
            q = self.q_idx[li]
            if q is not None:
                qn = q.numpy()
                m, v = m[qn], v[qn]
            mm = m.astype(np.float64) / (1 - b1s[li] ** ks[li])
            vv = v.astype(np.float64) / (1 - b2s[li] ** ks[li])
            u = np.sort(np.abs(mm / (np.sqrt(vv) + epss[li])))
            lo, hi = u[pos[li, :2]], u[pos[li, 2:]]
            out[li] = lo + (hi - lo) * frac[li]
        return torch.from_numpy(out)

    def _hists(self, w: Tensor, wm: Tensor | None, abs_m: Tensor | None,
               tau: Tensor | None = None) -> dict[str, tuple[Tensor, Tensor, list]]:
        """{quantity: (counts [L, bins] int64, stats [L, 4] float64, layer rows that have it)} (histograms.py).
        ``tau``: τ per weight as a device tensor (inside a CUDA graph, which must not bake in a Python number;
        the same float32 division as by the Python τ)."""
        from ..runlog.schema import HIST_EDGES

        def rel(x: Tensor) -> Tensor:  # (the Bop family: latent groups have no τ)
            return x / (self.tau if tau is None else tau)

        quantity = {"abs_w": lambda: w.abs(), "abs_m_rel": lambda: rel(abs_m), "wm_rel": lambda: rel(wm),
                    "abs_m": lambda: abs_m}
        out = {}
        for q, rows in self._hist_rows().items():
            x = quantity[q]().double()
            edges = self._edges(q, HIST_EDGES[q])
            nb = edges.numel() + 1
            b = torch.bucketize(x, edges, right=True) + self.layer_id * nb
            if self.use_histc:
                cnt = torch.histc(b.double(), bins=self.L * nb, min=0, max=self.L * nb).to(torch.int64)
            else:
                cnt = torch.bincount(b, minlength=self.L * nb)
            stats = self._layer_stats(x)
            out[q] = (cnt.view(self.L, nb), stats, rows)
        return out

    def _layer_stats(self, x: Tensor) -> Tensor:
        """[L, 4] float64 (min, max, Σx, Σx²) per layer of a flat float64 tensor: ordinary reductions of each layer's
        view (on CUDA ``segment_reduce`` runs one thread block per segment, ~1 ms per call on a 4 M-weight layer)."""
        rows = []
        for t in x.split(self.ns):
            if t.numel() == 0:
                rows.append(torch.full((4,), _NAN, dtype=torch.float64, device=x.device))
                continue
            lo, hi = torch.aminmax(t)
            rows.append(torch.stack([lo, hi, t.sum(), torch.dot(t, t)]))
        return torch.stack(rows)

    def _edges(self, q: str, edges: list[float]) -> Tensor:
        cache = self.__dict__.setdefault("_edge_cache", {})
        if q not in cache:
            cache[q] = torch.tensor(edges, dtype=torch.float64, device=self.device)
        return cache[q]

    # ------------------------------------------------------------------ per-layer views (state_dict, flush)
    STATE_NAMES = ("sign0", "count", "last", "prev_above", "wm_prev", "m_prev")

    def layer_state(self, k: int) -> dict[str, Tensor | None]:
        """The per-weight state of layer k of the group (views; ``Probe.state_dict`` copies them)."""
        out = {"count": self.layer_slice(self.count, k), "last": self.layer_slice(self.last, k)}
        if self.onepass is not None:
            out.update(self.onepass.layer_state(k))
        else:
            out.update({n: self.layer_slice(getattr(self, n), k) for n in ("sign0", "prev_above", "wm_prev",
                                                                            "m_prev")})
        return out

    def load_layer_state(self, k: int, name: str, value: Tensor) -> None:
        """Restore one entry of :meth:`layer_state` (a resumed run)."""
        if self.onepass is not None:
            self.onepass.load_layer_state(k, name, value)
            if name == "sign0":
                self.layer_slice(self.sign0, k).copy_(value.reshape(-1))
            return
        dst = self.layer_slice(getattr(self, name), k)
        if dst is not None:
            dst.copy_(value.reshape(-1))

    def layer_slice(self, t: Tensor | None, li: int) -> Tensor | None:
        if t is None:
            return None
        return t[self.offsets[li]:self.offsets[li] + self.ns[li]]
