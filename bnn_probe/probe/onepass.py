"""The probe's CPU fast path: one compiled pass per (group, step) over the weights, read in place.

A :class:`OnePass` belongs to a :class:`~bnn_probe.probe.flat.FlatGroup` on the CPU when the extension
``bnn_probe.probe._pass`` is installed (probe/cpu_pass.py). Per step:

* before the optimizer step, ``pre``: b(w_{t−1}) is compared with the stored sign byte of every weight and the
  byte (and the sign hash) changed only where the weights moved outside the step; the latent family copies w̃_{t−1};
* after the step, ``bop_post`` / ``lat_post``: one pass over w_t, m_t (Bop2ndOrder: m̂_t) and g_t of every layer
  through a table of data pointers (no concatenation) gives every count of the steps table (flips, c2i_diff,
  non-finite gradients, |m| > τ, crossings, the margin ladder), Σ|m| (float64), the flipped weights' indices, and
  updates the flip counters, last-flip steps and the sign hash (Σ r_i over weights with b(w_i) = +1, kept
  incrementally: only weights whose sign changed add or remove their r_i, so the hash is exact and costs nothing
  per unchanged weight) and the histogram of flip counts that ``weight_flips.parquet`` holds (``flip_hist``: a
  flipping weight moves from bin c to c + 1, so a flush reads no counter);
* the pass also picks up the quantile sample into [3, L, K] (sorted indices, while each block is in cache). For the
  Bop family the same call (``bop_step``) writes the flip events and tracked weights of the step, gathered from the
  buffers the pass wrote (m_t and w_t·m_t, kept for one more step); when the steps table is logged numpy sorts the
  sample rows in place (one call for |m|, w·m and the margin) and ``bop_rows`` writes the table's rows. So a Bop
  step is two C calls and one sort, into fixed buffers that the recorder copies. The latent family with the sign
  binarizer does the same (``lat_step``: events and tracked weights from w_t and the pre pass's copy of w_{t−1};
  ``lat_rows``); with another binarizer its events and tracked weights take the binarizer's margin in Python.
* inside bnn-probe's Bop (``run``: the step and the pass in one call) the tracked weights are picked up block by
  block in the pass (``plan.trk_mode``) and the flip events right after it; the event sampler's uniforms come from
  :class:`Uniforms` (drawn 256 steps at a time when the group is its generator's only user). For a probe with one
  Bop-family group, probe/lane.py points the C calls' outputs (the plan's ``rows_*``, ``ev_*``, ``tr_*``) at rows
  of the recorder's buffers (``Recorder.buffer``), so nothing is copied after the step.

Values are those of the per-layer reference (probe/quantities.py + probe/context.py): the same IEEE comparisons in
the weights' dtype, float64 sums to rounding (tests/test_probe_flat.py).
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..optim.cstep import MEASURE_ATTR
from ..optim.nonfinite import FINITE_ATTR
from ..runlog.schema import HIST_EDGES
from . import cpu_pass
from .cpu_pass import NC_BOP, NC_LAT, S_ABOVE, S_SIGN, S_SIGN0

if TYPE_CHECKING:
    from .flat import FlatGroup

__all__ = ["OnePass", "usable"]

_NAN = float("nan")
FLIP_BINS = 64  # initial bins of the flip-count histogram per layer (flip_hist); it grows up to FLIP_BINS_MAX
FLIP_BINS_MAX = 1 << 16
_EDGES = {q: np.asarray(e, dtype=np.float64) for q, e in HIST_EDGES.items()}
_LUTS: dict[str, np.ndarray] = {}
_HIST_KIND = {"abs_m_rel": 0, "wm_rel": 1, "abs_m": 2, "abs_w": 3}  # bnnp_hist's kind of each quantity


_warned = False


def usable(layers, dtype: torch.dtype, device: torch.device) -> bool:
    """The compiled pass measures this group: CPU float32/float64 parameters and the extension is installed. On the
    CPU without the extension, warns once that the slower pure-torch path measures instead."""
    global _warned
    if device.type != "cpu":
        return False
    if cpu_pass.load() is None:
        if not _warned and not os.environ.get("BNN_PROBE_NO_KERNEL"):
            _warned = True
            warnings.warn("bnn-probe: the compiled CPU measurement (bnn_probe.probe._pass) is not installed, so the "
                          "probe measures with its slower pure-torch path (same values); reinstall bnn-probe on a "
                          "machine with a C compiler to get it", RuntimeWarning, stacklevel=3)
        return False
    return dtype in (torch.float32, torch.float64) and all(ly.param.is_contiguous() for ly in layers)


def _fusable_optimizer(grp: FlatGroup):
    """The bnn_probe Bop that steps every layer of ``grp`` with its own step and its momentum ``exp_avg`` (then its
    step can measure for the probe, optim/cstep.py), else None."""
    from ..optim.bop import Bop

    opts = {id(ly.optimizer): ly.optimizer for ly in grp.layers}
    if len(opts) != 1 or grp.family != "bop" or grp.mkey != "exp_avg":
        return None
    opt = next(iter(opts.values()))
    return opt if isinstance(opt, Bop) and type(opt).step is Bop.step else None


def _aligned(n: int, dtype: np.dtype) -> np.ndarray:
    """An empty array whose data starts on a 64-byte boundary (the pass's streaming stores need it)."""
    raw = np.empty(n * dtype.itemsize + 64, dtype=np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + n * dtype.itemsize].view(dtype)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


_data_ptr = Tensor.data_ptr


class Uniforms:
    """The flip-event sampler's uniforms, U[0, 1) float64 [L, E] per events step, drawn from the probe's generator
    ``block`` steps at a time when the group is the generator's only user (else one draw per step).

    On the CPU, ``torch.rand`` fills a [B, L, E] tensor from the generator's stream in order, so B steps' slices
    are the values and order of B draws of [L, E] (the values logged are unchanged); what the prefetch saves is a
    ``torch.rand`` call per step inside the training step. :meth:`generator_state` is the generator's state as if
    only the slices handed out had been drawn (what a checkpoint stores)."""

    def __init__(self, gen: torch.Generator, L: int, E: int, block: int = 256) -> None:
        block = max(1, min(block, (1 << 17) // max(1, L * E)))  # at most 1 MiB of uniforms ahead
        self.gen, self.block = gen, block
        self.buf = torch.empty(block, L, E, dtype=torch.float64)
        self.stride = L * E * 8
        self.base = self.buf.data_ptr()
        self.i = block  # the next slice to hand out (block: none left)
        self.state0: Tensor | None = None  # the generator's state before the block was drawn

    def take(self) -> int:
        """The address of the next [L, E] slice (drawing the next block when none is left)."""
        if self.i == self.block:
            self.state0 = self.gen.get_state()
            torch.rand(self.buf.shape, generator=self.gen, dtype=torch.float64, out=self.buf)
            self.i = 0
        self.i += 1
        return self.base + (self.i - 1) * self.stride

    def generator_state(self) -> Tensor:
        """The generator's state after the draws of the slices handed out so far (not of those drawn ahead)."""
        if self.i == self.block or self.state0 is None:
            return self.gen.get_state()
        g = torch.Generator().manual_seed(0)
        g.set_state(self.state0)
        torch.rand(self.i, *self.buf.shape[1:], generator=g, dtype=torch.float64)
        return g.get_state()


class OnePass:
    """The per-weight state and buffers of the compiled pass for one flat group (see the module docstring)."""

    def __init__(self, grp: FlatGroup, w: Tensor, sign0: Tensor, above: Tensor | None, m: Tensor | None) -> None:
        self.g = grp
        N, L = grp.N, grp.L
        self.npdtype = grp.np_dtype
        self.k = cpu_pass.load()[self.npdtype]
        self.bop = grp.bop
        self.opts = list({id(ly.optimizer): ly.optimizer for ly in grp.layers}.values()) if self.bop else []
        self.lens = np.asarray(grp.ns, dtype=np.int64)
        self.offs = np.asarray(grp.offsets, dtype=np.int64)
        self.wp = np.zeros(L, dtype=np.uintp)
        self.mp = np.zeros(L, dtype=np.uintp)
        self.gp = np.zeros(L, dtype=np.uintp)
        # run() rewrites the gradients' pointers every step: struct.pack_into on the table's bytes costs a fraction
        # of a numpy assignment from a list (cold caches inside the training step)
        self._pack_gp = functools.partial(struct.Struct(f"={L}Q").pack_into, memoryview(self.gp).cast("B"), 0)
        s0 = _np(sign0).view(np.uint8)
        self.state = (s0 * (S_SIGN | S_SIGN0)).astype(np.uint8)
        if above is not None:
            self.state |= _np(above).view(np.uint8) * np.uint8(S_ABOVE)
        self.count_np, self.last_np = _np(grp.count), _np(grp.last)
        self.mix = _np(grp.mix) if grp.sign_hash else None
        self.hash = np.zeros(L, dtype=np.int64)
        if grp.sign_hash and N:  # exact int64 sums of r_i over b(w_0) = +1, per layer
            self.hash[:] = np.add.reduceat(np.where(s0.astype(bool), self.mix.astype(np.int64), 0), self.offs)
        self.sgn = np.empty(N, dtype=np.uint8) if grp.any_custom else None
        self.counts = np.zeros((L, NC_BOP if self.bop else NC_LAT), dtype=np.int64)
        self.sum_abs = np.zeros(L, dtype=np.float64)
        # the weight_flips table's histogram, kept flip by flip in the pass (flip_hist): counters start at 0
        self.fcap = FLIP_BINS
        self.fhist = np.zeros((L, self.fcap), dtype=np.int64)
        self.fhist[:, 0] = self.lens
        self.fover = np.zeros(L, dtype=np.uint8)
        P = self.plan = cpu_pass.Plan()
        P.L = L
        P.set(lens=self.lens, offs=self.offs, wp=self.wp, mp=self.mp, gp=self.gp, sgn=self.sgn, state=self.state,
              count=self.count_np, last=self.last_np, mix=self.mix, hash=self.hash,
              fidx=np.empty(N, dtype=np.int64), flast=np.empty(N, dtype=np.int32), counts=self.counts,
              sum_abs=self.sum_abs, fhist=self.fhist, fover=self.fover)
        P.fcap = self.fcap
        self.pplan = ctypes.byref(P)
        # Bop's step and this measurement in one pass (optim/cstep.py): the group's layers all stepped by one
        # bnn_probe Bop with its own step and momentum key, sign binarizer
        self.fuse_opt = _fusable_optimizer(grp) if self.bop and self.sgn is None else None
        self.m_bufs: list[np.ndarray] | None = None
        self.wm_bufs: list[np.ndarray] | None = None
        self.stale = False  # m_bufs / wm_bufs [cur] behind the weights (steps measured in the fused pass)
        if self.bop:
            # each step flips plan.cur, then writes m_t, w_t·m_t into bufs[cur]; bufs[1 − cur] hold step t − 1's.
            # A group measured inside Bop's step needs them only for a step measured around the optimizer: made then
            P.cur = 1
            if self.fuse_opt is None:
                self._alloc_bufs()
                self.m_bufs[1][:] = _np(m)
                np.multiply(_np(w), _np(m), out=self.wm_bufs[1])
            else:
                self.stale = True
            self.prev_w = None
        else:
            self.prev_w = np.array(_np(w), copy=True)
            P.prev = self.prev_w.ctypes.data
        # events and tracked weights in C: the Bop family, and the latent family with bnn-probe's sign, whose inertia
        # |w| the C code computes (other binarizers' margins are torch code, measured in Python below)
        self.fast = self.bop or self.sgn is None
        # the step's outputs, rewritten every step (the recorder copies them): rows, events, tracked
        E = grp.E
        self.rows_i = np.empty((L, 4), dtype=np.int64)
        self.rows_f = np.empty((L, grp.n_float), dtype=np.float64)
        self.u = torch.empty(L, E, dtype=torch.float64)
        self.u_addr = self.u.data_ptr()
        self.unif: Uniforms | None = None  # the prefetched uniforms (draw_uniforms), when the generator is ours
        self.tail = 0  # events (bit 0) and tracked weights (bit 1) asked for at pre: done in the fused step (run)
        self._ptrs: list[int] | None = None  # the w, m pointers run() last wrote into wp, mp
        self.tail_done = 0
        self.ev_i = np.empty((L * E, 2), dtype=np.int64)
        self.ev_f = np.empty((L * E, 2), dtype=np.float64)
        P.nev, P.nfloat, P.hash_on, P.nbop = E, grp.n_float, int(bool(grp.sign_hash)), grp.n_bop_cols
        P.set(rows_i=self.rows_i, rows_f=self.rows_f, u=self.u.numpy(), ev_i=self.ev_i,
              ev_safe=np.empty(L * E, dtype=np.int64), ev_f=self.ev_f)
        self.out_steps = (self.rows_i, self.rows_f)  # numpy: the recorder copies them at once
        self.out_events = (self.ev_i, self.ev_f)
        self._own_rows = (self.rows_i.ctypes.data, self.rows_f.ctypes.data)
        self._own_events = (self.ev_i.ctypes.data, self.ev_f.ctypes.data)
        self.set_samples()
        self._keep: list[Tensor] = []
        self.param_ids = frozenset(id(ly.param) for ly in grp.layers)
        self._layer_ids = [id(ly.param) for ly in grp.layers]  # in layer order (run's jobs are keyed by id(w))
        self.pending = self.served = False
        self.plain_next = False  # measure the next step around the optimizer (an edit between steps, see edit())
        if self.fuse_opt is not None:
            self.hp = np.zeros((L, 3), dtype=self.npdtype)
            self._hp_key: list | None = None
            # the probe reads τ under the key the step reads it from: same (γ, τ) in the jobs, same τ for the probe
            self._tau_is_step_tau = all(k == "threshold" for k in grp.tkeys)
            self.nonfin = np.zeros(L, dtype=np.int64)
            self._unpack_nonfin = functools.partial(struct.Struct(f"={L}q").unpack_from, memoryview(self.nonfin))
            P.set(hp=self.hp, nonfin=self.nonfin, fwm=np.empty(N, dtype=self.npdtype),
                  fmo=np.empty(N, dtype=self.npdtype))

    def set_samples(self) -> None:
        """The quantile sample (sorted indices per layer, NaN-padded sample buffer) from the group's samples."""
        g = self.g
        K = g.qk
        self.samp = np.full((3, g.L, K), _NAN, dtype=self.npdtype)
        self.plan.K = K
        qidx = np.zeros((g.L, K), dtype=np.int64)
        for li, k in enumerate(g.qks):  # ascending: the pass picks the sample up in index order
            qidx[li, :k] = np.sort(g.qidx_np[li, :k])
        self.plan.set(ks=g.qks, qidx=qidx, samp=self.samp)
        self.samp_addr = self.samp.ctypes.data  # the pass picks the sample up only on quantile steps (post)
        P = self.plan
        P.Q, P.Qm, P.ntr = g.qfrac_np.shape[1], g.mfrac_np.shape[1], len(g.tsel_np)
        self.tr_sign = np.empty(len(g.tsel_np), dtype=np.bool_)
        self.tr_out = np.empty((len(g.tsel_np), 2), dtype=np.float64)
        P.set(qpos=np.ascontiguousarray(g.qpos_np), qfrac=np.ascontiguousarray(g.qfrac_np),
              mpos=np.ascontiguousarray(g.mpos_np), mfrac=np.ascontiguousarray(g.mfrac_np), tsel=g.tsel_np,
              tr_sign=self.tr_sign.view(np.uint8), tr_out=self.tr_out,
              tmprev=np.empty(len(g.tsel_np), dtype=self.npdtype))
        self.out_tracked = (self.tr_sign, self.tr_out)
        self._own_tracked = (self.tr_sign.ctypes.data, self.tr_out.ctypes.data)
        # the fused step picks the tracked weights up in its pass when their flat indices ascend (as sampled)
        self.tsel_sorted = bool(np.all(np.diff(g.tsel_np) > 0))
        self._trk_mode = P.trk_mode = 0

    def set_hyper(self, hp: dict[str, np.ndarray]) -> None:
        if self.bop:
            self.plan.set(tau=hp["tau"], thr=hp["thr"], tau_valid=hp["tau_valid"], tau_l=self.g.tau_l_np,
                          tau_t=self.g.tau_t_np)
        else:
            self.plan.set(clip=hp["clip"], clip_valid=hp["clip_valid"])

    # ------------------------------------------------------------------ pointers
    def _set_ptrs(self, dst: np.ndarray, ts: list[Tensor | None]) -> None:
        """Data pointers of ``ts`` (None: 0, a tensor the pass does not read), converted to the group's dtype and
        contiguous where needed."""
        dt = self.g.dtype
        ptrs = []
        for t in ts:
            if t is None:
                ptrs.append(0)
                continue
            if t.dtype != dt or not t.is_contiguous():
                t = t.detach().contiguous().to(dt)
                self._keep.append(t)  # alive until the next pass (the sample gather reads it)
            ptrs.append(t.data_ptr())
        dst[:] = ptrs  # one numpy assignment
        self._ptrs = None  # (the tables no longer hold what run() last wrote)

    def _momentum_ptrs(self) -> list[Tensor]:
        """m of every layer (the optimizer state under the group's momentum key; zeros where a layer has none, an
        error where it stepped without one) into the pointer table; returns the tensors."""
        g = self.g
        ms, missing = g._state_views(g.mkey)
        g.m_missing = missing
        if missing:
            g._check_momentum(missing)
        self._set_ptrs(self.mp, ms)
        return ms

    def _signs(self) -> None:
        """The binarizer stage for groups with a binarizer other than sign: [b(w) = +1] of the weights now, as the
        bytes the pass reads instead of w ≥ 0 (nothing to do with bnn-probe's sign everywhere)."""
        if self.sgn is not None:
            g = self.g
            g.binarize(g.cat_w(out=g.wbuf), torch.from_numpy(self.sgn).view(torch.bool))

    # ------------------------------------------------------------------ per step
    def layouts(self) -> tuple[tuple, tuple, tuple]:
        """((shape, dtype) of the steps rows, of the flip events, of the tracked weights): the recorder's buffers
        that probe/lane.py may send them to (Recorder.buffer)."""
        def lay(*arrays: np.ndarray) -> tuple:
            return tuple((a.shape, a.dtype) for a in arrays)
        return lay(self.rows_i, self.rows_f), lay(self.ev_i, self.ev_f), lay(self.tr_sign, self.tr_out)

    def pre(self, t: int, quant: bool, tail: int = 0) -> None:
        """Before the optimizer step ``t``: stored signs := b(w_{t−1}) where they changed; latent: w̃_{t−1} copied.
        The Bop family's optimizers lose last step's finite-gradient proof (only this step's may spare a read).
        With a fusable Bop (optim/cstep.py) nothing is read here: a request is left on the optimizer, whose step
        then either measures in its own pass (:meth:`run`) or declines (:meth:`decline`: this pre pass, then).
        ``tail``: the step's flip events (bit 0) and tracked weights (bit 1) will be logged; the fused step then
        gathers them right after its pass, while the weights are in cache (else :meth:`post` does)."""
        g = self.g
        self._keep = []
        for opt in self.opts:
            opt.__dict__.pop(FINITE_ATTR, None)
        self.served = False
        if self.fuse_opt is not None and not self.plain_next:  # the weights' pointers: in run() or decline()
            self.pending = True
            self.tail = tail if g.E > 0 else tail & 2  # (no event slots: no events)
            self.plan.t = t
            self.plan.samp = self.samp_addr if quant else None
            reqs = self.fuse_opt.__dict__.setdefault(MEASURE_ATTR, [])
            if self not in reqs:
                reqs.append(self)
            return
        self._set_ptrs(self.wp, [ly.param for ly in g.layers])
        self.pending = self.plain_next = False
        if self.sgn is not None:
            self._signs()
        self.k.pre(self.pplan, self.plan.prev)  # latent: w̃_{t−1} copied into prev_w (NULL for the Bop family)

    # ------------------------------------------------------------------ the fused step (optim/cstep.py)
    def run(self, jobs: dict[int, tuple[Tensor, Tensor, Tensor, float, float]]) -> dict[int, int]:
        """Inside Bop's step: step the group's layers that have a gradient (``jobs[id(w)] = (w, m, g, γ, τ)``) and
        measure every layer, in one pass (``bnnp_bop_fused``). Returns {id(w): non-finite entries skipped}."""
        g = self.g
        self.pending, self.served = False, True
        layers = g.layers
        js = list(map(jobs.get, self._layer_ids))
        full = None not in js
        if full:  # every layer stepped (the usual step): w, m, g, γ, τ from the step's own tensors
            # (contiguous, of the group's dtype: cstep.usable) w and m stay put; the gradients usually are new
            # tensors. Written with map and zip, not comprehensions: no Python frame per list (cold caches here)
            ws, ms, gs, gammas, taus = zip(*js, strict=True)
            ptrs = [*map(_data_ptr, ws), *map(_data_ptr, ms)]
            if ptrs != self._ptrs:  # the w, m tables are rewritten only when one of them moved
                L = len(js)
                self.wp[:], self.mp[:] = ptrs[:L], ptrs[L:]
                self._ptrs = ptrs
            self._pack_gp(*map(_data_ptr, gs))
            hp = list(zip(gammas, taus, strict=True))
            g.g_missing = g.m_missing = []
            tensors = ws + ms
        else:  # (_set_ptrs drops the cached pointers)
            self._set_ptrs(self.wp, [ly.param for ly in layers])
            ms = self._momentum_ptrs()
            self.gp[:] = [0 if j is None else j[2].data_ptr() for j in js]
            hp = [(0.0, 0.0) if j is None else (j[3], j[4]) for j in js]
            g.g_missing = [li for li, ly in enumerate(layers) if ly.param.grad is None]
            tensors = [j[0] for j in js if j is not None] + [m for m, j in zip(ms, js, strict=True) if j is not None]
        if hp != self._hp_key:  # (γ, τ) per layer, written only when a value changed
            self.hp[:] = [(gm, 1.0 - gm, tau) for gm, tau in hp]
            self._hp_key = hp
            g._read_hyper()
        elif not self._tau_is_step_tau or g._hyper_key is None:  # else the probe's τ is the step's, unchanged
            g._read_hyper()
        tail = self.tail
        if self.tsel_sorted:  # the tracked weights picked up block by block in the pass (trk_mode 2 or 1)
            mode, rest = (2 if tail & 2 else 1), tail & 1
        else:
            mode, rest = 0, tail
        if mode != self._trk_mode:
            self.plan.trk_mode = self._trk_mode = mode
        self.k.bop_fused(self.pplan)
        if rest:  # the events' gather, from w_t, m_t still in cache (and the tracked weights' for mode 0)
            if rest & 1:
                self.draw_uniforms()
            self.k.bop_tail(self.pplan, rest)
        self.tail_done = tail
        torch.autograd.graph.increment_version(tensors)
        if full:
            return dict(zip(self._layer_ids, self._unpack_nonfin(), strict=True))
        nonfin = self.nonfin.tolist()
        return {id(j[0]): nonfin[li] for li, j in enumerate(js) if j is not None}

    def draw_uniforms(self) -> None:
        """Point the plan at this step's [L, E] event-sampler uniforms: the next slice of a prefetched block when
        the group is its generator's only user (:class:`Uniforms`), else one draw now."""
        g = self.g
        if g.gen_shared:
            torch.rand(g.L, g.E, generator=g.gen, dtype=torch.float64, out=self.u)
            self.plan.u = self.u_addr
            return
        if self.unif is None:
            self.unif = Uniforms(g.gen, g.L, g.E)
        self.plan.u = self.unif.take()

    def decline(self) -> None:
        """Inside Bop's step, before any weight moves: this step is measured around the optimizer (pre pass now,
        post pass after the step), from buffers of step t − 1 brought up to date."""
        self.pending = False
        self.refresh()
        self._set_ptrs(self.wp, [ly.param for ly in self.g.layers])
        self.k.pre(self.pplan, self.plan.prev)

    def _alloc_bufs(self) -> None:
        N = self.g.N
        self.m_bufs = [_aligned(N, self.npdtype) for _ in range(2)]
        self.wm_bufs = [_aligned(N, self.npdtype) for _ in range(2)]
        for i in range(2):
            self.plan.mbuf[i], self.plan.wmbuf[i] = self.m_bufs[i].ctypes.data, self.wm_bufs[i].ctypes.data

    def refresh(self) -> None:
        """m_{t−1}, w_{t−1}·m_{t−1} buffers := the weights and momenta now (after fused steps, which write none;
        made here when the group had none yet)."""
        if not self.stale:
            return
        if self.m_bufs is None:
            self._alloc_bufs()
        g = self.g
        ms, _ = g._state_views(g.mkey)
        mb, wmb = self.m_now, self.wm_now
        for li, ly in enumerate(g.layers):
            sl = self._sl(li)
            mb[sl] = _np(ms[li]).reshape(-1)
            np.multiply(_np(ly.param).reshape(-1), mb[sl], out=wmb[sl])
        self.stale = False

    def edit(self) -> None:
        """Before the weights or momenta are changed between steps (bnn_probe.interventions): the next step is
        measured around the optimizer, against the values before the change (as the per-layer reference does)."""
        self.refresh()
        self.plain_next = True

    def post(self, t: int, events: bool = False, tracked: bool = False, quant: bool = True) -> None:
        """After the optimizer step t: the pass; leaves counts, Σ|·|, the flipped weights and (``quant``) the
        quantile sample in the buffers, and for the Bop family (same call) the flip events and tracked weights when
        asked for. Copies made for the pass (m̂, non-contiguous tensors) stay alive until the next pass."""
        g = self.g
        if self.served:  # measured inside the optimizer's step: the events and tracked weights not gathered there
            self.served, self.stale = False, True
            need = (int(events and g.E > 0) | int(tracked) << 1) & ~self.tail_done
            if need & 1:
                self.draw_uniforms()
            if need:
                self.k.bop_tail(self.pplan, need)
            return
        if self.pending:  # the request was never taken (the probed step did not run Bop.step)
            self._unserved()
        self.plan.samp = self.samp_addr if quant else None
        self._keep = []
        layers = g.layers
        self._set_ptrs(self.wp, [ly.param for ly in layers])
        grads = [ly.param.grad for ly in layers]
        g.g_missing = [li for li, gr in enumerate(grads) if gr is None]
        if self.bop:  # gradients that cannot hold a NaN/±inf are not read (count 0): missing ones, and those the
            # optimizer's own check proved finite in this step (bnn_probe's Bop family: optim/nonfinite.py)
            for li, ly in enumerate(layers):
                fin = ly.optimizer.__dict__.get(FINITE_ATTR)
                if fin is not None and id(ly.param) in fin:
                    grads[li] = None
        else:
            for li in g.g_missing:
                grads[li] = g._zeros_like_layer(li)
        self._set_ptrs(self.gp, grads)
        if self.sgn is not None:
            self._signs()
        P = self.plan
        P.t = t
        if self.bop:
            if g.family == "bop2nd":  # m̂ = m/(sqrt(v)+eps) computed by torch into one flat buffer
                mh = g.cat_m()
                base, isz = mh.data_ptr(), mh.element_size()
                self.mp[:] = [base + o * isz for o in g.offsets]
                self._ptrs = None
                self._keep.append(mh)
            else:
                self._momentum_ptrs()
        if not self.fast:
            self.k.lat_post(self.pplan)
            return
        if events and g.E > 0:  # the sampler's uniforms (the generator's stream, as the reference draws them)
            self.draw_uniforms()
        (self.k.bop_step if self.bop else self.k.lat_step)(self.pplan, int(events) | int(tracked) << 1)

    def withdraw(self) -> None:
        """Take this group's request off the optimizer (the probe closes)."""
        self.pending = False
        if self.fuse_opt is not None:
            reqs = self.fuse_opt.__dict__.get(MEASURE_ATTR, [])
            if self in reqs:
                reqs.remove(self)

    def _unserved(self) -> None:
        self.withdraw()
        self.refresh()  # (after the step: this step's step sizes read 0)
        warnings.warn(f"bnn-probe: the probed optimizer step did not run {type(self.fuse_opt).__name__}.step, so "
                      f"the probe's measurement inside it did not happen; this step's flips also count sign changes "
                      f"made outside the step, its step sizes are 0, and from now on the probe measures around the "
                      f"optimizer",
                      RuntimeWarning, stacklevel=2)
        self.fuse_opt = None  # no pre pass now: the post pass compares with the signs of the last measurement

    # ------------------------------------------------------------------ views of the buffers
    @property
    def m_now(self) -> np.ndarray:
        return self.m_bufs[self.plan.cur]

    @property
    def wm_now(self) -> np.ndarray:
        return self.wm_bufs[self.plan.cur]

    def sign_now(self) -> np.ndarray:
        """bool [b(w_t) = +1] of every weight (after the last measured step)."""
        return (self.state & S_SIGN) > 0

    def w_at(self, idx: np.ndarray) -> np.ndarray:
        """w_t at flat indices (gathered from the parameters in place)."""
        out = np.empty(len(idx), dtype=self.npdtype)
        layer = np.searchsorted(self.offs, idx, side="right") - 1
        for li, ly in enumerate(self.g.layers):
            sel = layer == li
            if sel.any():
                out[sel] = _np(ly.param).reshape(-1)[idx[sel] - self.offs[li]]
        return out

    # ------------------------------------------------------------------ rows of the log
    def steps(self, quant: bool = True) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray]:
        """(int64 [L, 4] = flips, c2i_diff, nonfinite_grads, sign_hash; float64 [L, n_float]) of this step; the
        quantile columns NaN unless ``quant`` (the post pass was told the same). The rows are the step's fixed numpy
        buffers (valid until the next step), written by ``bnnp_bop_rows`` / ``bnnp_lat_rows`` (Adam's step quantiles
        added here)."""
        g = self.g
        if self.bop:
            if quant:  # |m|, w·m and the margin rows at once, in place (NaN padding stays last)
                self.samp.sort(axis=-1)
            self.k.bop_rows(self.pplan)  # quantile columns NaN when the plan has no sample (post)
            return self.out_steps
        if quant:
            self.samp[0].sort(axis=-1)  # the |w| rows, in place
        self.k.lat_rows(self.pplan)
        if quant and any(g.adam):
            nb = g.n_bop_cols
            self.rows_f[:, nb + 7:nb + 9] = g._adam_step().numpy()
        return self.out_steps

    def events(self) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray]:
        """Up to E flipped weights per layer, stratified (probe/samplers.py's rule, all layers at once):
        (int64 [L·E, 2] = index in the layer (−1: empty slot), steps since its previous flip (−1: none);
        float64 [L·E, 2] = inertia just before the step, step size). The Bop family's come from the step's call
        (``post(events=True)``)."""
        if self.fast:
            return self.out_events
        g = self.g
        E, L = g.E, g.L
        u = torch.rand(L, E, generator=g.gen, dtype=torch.float64).numpy()
        ints = np.empty((L * E, 2), dtype=np.int64)
        safe = np.empty(L * E, dtype=np.int64)
        floats = np.empty((L * E, 2), dtype=np.float64)
        self.k.events(self.pplan, E, u.ctypes.data, None, None, None, None, ints.ctypes.data, safe.ctypes.data, None)
        pw = self.prev_w[safe]
        if g.any_custom:
            floats[:, 0] = g.margin(torch.from_numpy(self.prev_w))[torch.from_numpy(safe)].double().numpy()
        else:
            floats[:, 0] = np.abs(pw)
        floats[:, 1] = np.abs(self.w_at(safe).astype(np.float64) - pw.astype(np.float64))
        floats[ints[:, 0] < 0] = _NAN
        return torch.from_numpy(ints), torch.from_numpy(floats)

    def tracked(self) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray]:
        """(b(w_t) = +1 as bool, float64 [T, 2] = (inertia, step size)) of the tracked weights (the Bop family's
        from the step's call, ``post(tracked=True)``)."""
        if self.fast:
            return self.out_tracked
        g = self.g
        idx = g.tsel_np
        sign = (self.state[idx] & S_SIGN) > 0
        wt = self.w_at(idx)
        if g.any_custom:
            inertia = g.margin(g.cat_w(out=g.wbuf))[torch.from_numpy(idx)].double().numpy()
        else:
            inertia = np.abs(wt).astype(np.float64)
        step = np.abs(wt.astype(np.float64) - self.prev_w[idx].astype(np.float64))
        return torch.from_numpy(sign), torch.from_numpy(np.stack([inertia, step], 1))

    def hists(self) -> dict[str, tuple[Tensor, Tensor, list[int]]]:
        """{quantity: (counts [L, bins] int64, stats [L, 4] float64, layer rows that have it)} of this step, by
        ``bnnp_hist`` over the weights in place (probe/histograms.py's definitions)."""
        g = self.g
        out = {}
        for q, rows in g._hist_rows().items():  # (the device path's quantities and rows, FlatGroup._hists)
            kind = _HIST_KIND[q]
            edges = _EDGES[q]
            lut = _LUTS.get(q)
            if lut is None:
                lut = _LUTS[q] = cpu_pass.hist_lut(edges)
            mask = np.zeros(g.L, dtype=np.uint8)
            mask[rows] = 1
            cnt = np.zeros((g.L, len(edges) + 1), dtype=np.int64)
            stats = np.full((g.L, 4), _NAN)
            self.k.hist(self.pplan, kind, mask.ctypes.data, edges.ctypes.data, len(edges), lut.ctypes.data,
                        cnt.ctypes.data, stats.ctypes.data)
            out[q] = (torch.from_numpy(cnt), torch.from_numpy(stats), rows)
        return out

    # ------------------------------------------------------------------ state (resume)
    def _sl(self, k: int) -> slice:
        return slice(int(self.offs[k]), int(self.offs[k] + self.lens[k]))

    def layer_state(self, k: int) -> dict[str, Tensor | None]:
        sl = self._sl(k)
        st = self.state[sl]
        out = {"sign0": torch.from_numpy((st & S_SIGN0) > 0), "prev_above": None, "wm_prev": None, "m_prev": None}
        if self.bop:
            self.refresh()
            out["prev_above"] = torch.from_numpy((st & S_ABOVE) > 0)
            out["wm_prev"] = torch.from_numpy(self.wm_now[sl].copy())
            out["m_prev"] = torch.from_numpy(self.m_now[sl].copy())
        return out

    def load_layer_state(self, k: int, name: str, value: Tensor) -> None:
        sl = self._sl(k)
        v = value.detach().cpu().reshape(-1).numpy()
        bit = {"sign0": S_SIGN0, "prev_above": S_ABOVE}.get(name)
        if bit is not None and (self.bop or name == "sign0"):
            self.state[sl] = (self.state[sl] & np.uint8(0xFF ^ bit)) | (v.astype(np.uint8) * np.uint8(bit))
        elif name == "wm_prev" and self.bop:
            self.refresh()
            self.wm_now[sl] = v
        elif name == "m_prev" and self.bop:
            self.refresh()
            self.m_now[sl] = v
        elif name in ("count", "last"):
            (self.count_np if name == "count" else self.last_np)[sl] = v
            if name == "count":
                self.fover[k] = 1  # the flip-count histogram is rebuilt from the loaded counters

    # ------------------------------------------------------------------ the weight_flips table
    def flip_hist(self, k: int) -> np.ndarray | None:
        """Weights of layer ``k`` that flipped exactly 0, 1, 2, … times (up to the last non-empty bin), as the pass
        keeps it flip by flip (``finish_flips``), or None where it has to be rebuilt from the counters
        (:meth:`set_flip_hist`): a weight reached the histogram's size, or counters were loaded."""
        if self.fover[k]:
            return None
        h = self.fhist[k]
        nz = np.flatnonzero(h)
        return h[:nz[-1] + 1].copy() if len(nz) else h[:1].copy()

    def set_flip_hist(self, k: int, bins: np.ndarray) -> None:
        """Layer ``k``'s histogram from ``bins`` (a bincount of its counters); the histogram grows (all layers, up
        to FLIP_BINS_MAX bins) to hold it with room to spare, else it stays rebuilt at each flush."""
        n = len(bins)
        if n >= self.fcap:
            if n >= FLIP_BINS_MAX:
                self.fover[k] = 1
                return
            cap = min(FLIP_BINS_MAX, 1 << int(2 * n - 1).bit_length())
            grown = np.zeros((self.g.L, cap), dtype=np.int64)
            grown[:, :self.fcap] = self.fhist
            self.fhist, self.fcap = grown, cap
            self.plan.set(fhist=grown)
            self.plan.fcap = cap
        self.fhist[k] = 0
        self.fhist[k, :n] = bins
        self.fover[k] = 0
