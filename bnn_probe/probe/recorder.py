"""Buffers the probe's per-step results, turns them into rows in batches and writes them to the run log.

Per step the probe hands over a few small tensors (one int64 and one float64 block for the steps table, and
fixed-size tensors for tracked weights and flip events). CPU tensors (and numpy arrays) are copied at once into
preallocated host buffers of ``buffer_steps`` steps — the caller may reuse its buffers at the next step; device
tensors stay on the device until :meth:`Recorder.drain`, which stacks them and copies each kind to the host once.
A drain (when ``buffer_steps`` steps are pending, or at a flush) turns the buffered steps into column arrays with
vectorised numpy (no Python per row) and encodes their TensorBoard scalars in bulk
(:func:`bnn_probe.runlog.tbevents.encode_scalar_events`: one event per step holding every layer's values).
:meth:`Recorder.flush` writes the columns as new Parquet parts (built as Arrow tables directly, no DataFrame) and the
TensorBoard records.

Example:
    >>> Recorder.INT_COLUMNS
    ('flips', 'c2i_diff', 'nonfinite_grads', 'sign_hash')
"""

from __future__ import annotations

import math
import operator
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..runlog.schema import HIST_EDGES, HIST_QUANTITIES, STEPS
from ..runlog.writer import RunWriter, nullable_int, string_column

__all__ = ["Recorder", "MISSING_INT"]

MISSING_INT = -(2**63)  # sentinel for a null int64 (e.g. sign_hash switched off)
HOST_COLUMNS = ("flip_ratio", "flip_ratio_running", "c2i", "c2i_corr", "gamma", "threshold", "lr", "sigma")
_INT_COLUMNS = ("flips", "c2i_diff", "nonfinite_grads", "sign_hash")
_HYPER = ("gamma", "threshold", "lr", "sigma")
_Array = Tensor | np.ndarray
_BINCOUNT_TYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _split_floats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[S, T, 2] → ([S, T] inertia, [S, T] step_size); [S, T] → (x, NaN)."""
    if x.ndim == 3:
        return x[:, :, 0], x[:, :, 1]
    return x, np.full(x.shape, math.nan)


def _on_device(x: _Array) -> bool:
    return isinstance(x, Tensor) and not x.is_cpu


def _host(x: _Array) -> np.ndarray:
    """A numpy view of a CPU tensor or array (a copy for a device tensor)."""
    if isinstance(x, np.ndarray):
        return x
    return x.numpy() if x.is_cpu and not x.requires_grad else x.detach().cpu().numpy()


_NP_DTYPES: dict[torch.dtype, np.dtype] = {}


def _np_dtype(a: _Array) -> np.dtype:
    if isinstance(a, np.ndarray):
        return a.dtype
    d = _NP_DTYPES.get(a.dtype)
    if d is None:
        d = _NP_DTYPES[a.dtype] = torch.empty(0, dtype=a.dtype).numpy().dtype
    return d


class _Pending:
    """The per-step arrays of one kind since the last drain, with each step's number and wall-clock time.

    Host mode (the first item after a drain has no device tensor): each item is copied into preallocated numpy
    buffers of ``capacity`` steps, so the caller may reuse its buffers. Device mode (the first item holds a device
    tensor): device tensors are kept and stacked and copied to the host once at :meth:`take`; host arrays are
    copied at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.n = 0
        # step numbers and wall-clock times as Python lists: a list item costs a fraction of a numpy scalar
        # assignment in a step hook, where every call runs from cold caches
        self.steps: list[int] = [0] * capacity
        self.wall: list[float] = [math.nan] * capacity
        self.bufs: list[np.ndarray] | None = None
        self.layout: tuple | None = None  # ((shape, dtype) per array) the host buffers were made for
        self.dev: list[tuple[int, float, tuple[_Array, ...]]] = []
        self._src: tuple[np.ndarray, ...] | None = None  # the numpy arrays of the last step, once checked
        self._addr: tuple | None = None  # (bufs, [(address, row stride)]) for reserve

    def __len__(self) -> int:
        return self.n + len(self.dev)

    def add(self, step: int, arrays: tuple[_Array, ...], wall: float = math.nan) -> bool:
        """Take one step's arrays; False (nothing taken) when the host buffers are full or hold other shapes or
        dtypes: the caller drains and adds again."""
        i = self.n
        if i and not self.dev:  # the every-step path: host buffers made, same layout expected
            if i >= self.capacity:
                return False
            if self._src is not None and len(arrays) == len(self._src) and all(map(operator.is_, arrays, self._src)):
                for b, a in zip(self.bufs, arrays, strict=True):  # type: ignore[arg-type]
                    b[i] = a  # the same numpy buffers as the last step's (checked then)
            else:
                # one loop: a mismatch returns before n moves on, so a partly written row i is never taken
                for b, a, (shape, dtype) in zip(self.bufs, arrays, self.layout, strict=True):  # type: ignore[arg-type]
                    if a.shape != shape or a.dtype != dtype:
                        return False
                    b[i] = a if type(a) is np.ndarray else _host(a)
                self._src = arrays if all(type(a) is np.ndarray for a in arrays) else None
        elif self.dev or any(_on_device(a) for a in arrays):  # device mode
            self.dev.append((step, wall, tuple(a if _on_device(a) else np.array(_host(a)) for a in arrays)))
            return True
        else:  # the first step after a drain
            self._src = None
            if self.layout is None or any(a.shape != s or a.dtype != d
                                          for a, (s, d) in zip(arrays, self.layout, strict=True)):
                self.bufs = [np.empty((self.capacity, *a.shape), dtype=_np_dtype(a)) for a in arrays]
                self.layout = tuple((a.shape, a.dtype) for a in arrays)
            for b, a in zip(self.bufs, arrays, strict=True):  # type: ignore[arg-type]
                b[0] = _host(a)
        self.steps[i] = step
        self.wall[i] = wall
        self.n = i + 1
        return True

    def reserve(self, layout: tuple) -> list[int] | None:
        """The addresses of the next row of each host buffer, made for ``layout`` ((shape, numpy dtype) per array,
        as :meth:`add` records it), for a writer that fills them in place (the probe's compiled pass); then
        :meth:`commit` takes the row. None in device mode, when the buffers are full or were made for another
        layout (the caller then adds as usual)."""
        i = self.n
        if self.dev or i >= self.capacity:
            return None
        if self.layout is not layout and self.layout != layout:  # (the writer passes the same tuple every step)
            if i:
                return None
            self.bufs = [np.empty((self.capacity, *shape), dtype=dtype) for shape, dtype in layout]
            self.layout = layout
        if self._addr is None or self._addr[0] is not self.bufs:
            self._addr = (self.bufs, [(b.ctypes.data, b.strides[0]) for b in self.bufs])  # type: ignore[union-attr]
        addr = self._addr[1]
        if len(addr) == 2:  # the probe's every-step case, written out (no comprehension's frame)
            (a0, s0), (a1, s1) = addr
            return [a0 + i * s0, a1 + i * s1]
        return [a + i * s for a, s in addr]

    def commit(self, step: int, wall: float = math.nan) -> None:
        """Take the row :meth:`reserve` handed out (filled in place) as step ``step``'s."""
        i = self.n
        self.steps[i] = step
        self.wall[i] = wall
        self.n = i + 1
        self._src = None

    def take(self) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(steps [S], wall times [S], one [S, ...] host array per kind) of every pending step; empties it."""
        if self.dev:
            items, self.dev = self.dev, []
            steps = np.array([it[0] for it in items], dtype=np.int64)
            wall = np.array([it[1] for it in items], dtype=np.float64)
            arrays = []
            for k in range(len(items[0][2])):
                xs = [it[2][k] for it in items]
                if all(isinstance(x, Tensor) for x in xs):  # one device → host copy per kind
                    arrays.append(torch.stack(xs).cpu().numpy())
                else:
                    arrays.append(np.stack([_host(x) for x in xs]))
            return steps, wall, arrays
        n, self.n = self.n, 0
        assert self.bufs is not None
        return (np.array(self.steps[:n], dtype=np.int64), np.array(self.wall[:n], dtype=np.float64),
                [b[:n].copy() for b in self.bufs])


class Recorder:
    """Per-step results → host buffers → column arrays → Parquet parts + TensorBoard."""

    INT_COLUMNS = _INT_COLUMNS
    FLOAT_COLUMNS = tuple(c for c in STEPS if c not in ("step", "layer", *_INT_COLUMNS, *HOST_COLUMNS))

    def __init__(self, writer: RunWriter, layer_names: list[str], n_weights: list[int], families: list[str],
                 buffer_steps: int = 256, tb_every=None) -> None:
        self.writer = writer
        self.names = layer_names
        self.n = np.asarray(n_weights, dtype=np.int64)
        self.families = families
        self.L = len(layer_names)
        self.buffer_steps = max(1, int(buffer_steps))
        self.tb_every = tb_every
        self.fpos = {c: i for i, c in enumerate(self.FLOAT_COLUMNS)}
        self.run_sum = np.zeros(self.L)
        self.run_n = np.zeros(self.L, dtype=np.int64)
        self._steps = _Pending(self.buffer_steps)
        # the steps rows' [L, 4] hyperparameters (γ, τ, lr, σ), kept where they change: (pending row, values) from
        # the first row since the last drain on; the rows in between repeat the last values (_hyper_rows)
        self._hyper_at: list[tuple[int, np.ndarray]] = []
        self._hyper_last: np.ndarray | None = None  # the array object last noted (identity: see commit_step)
        self._tracked = _Pending(self.buffer_steps)
        self._events = _Pending(self.buffer_steps)
        self._kinds = {"steps": self._steps, "tracked": self._tracked, "events": self._events}
        self._hists: list[tuple[int, int, str, _Array, _Array]] = []
        self._snaps: list[tuple[int, int, int, bytes | Tensor]] = []
        self._host: dict[str, list[dict[str, Any]]] = {t: [] for t in ("steps", "tracked", "events", "hists",
                                                                       "snapshots")}
        self._train_rows: list[tuple[Any, Any, str, float, float]] = []
        self._pos_cache: dict[tuple, Tensor] = {}
        self.track_layout: list[tuple[int, np.ndarray]] = []  # per layer (offset, host indices)
        self.events_per_layer = 0
        extra = {fam: ("abs_m_q50" if fam != "latent" else "abs_w_q50") for fam in set(families)}
        self._tb_q = [extra[f] for f in families]  # the per-layer magnitude quantile shown in TensorBoard
        self._tb_tags = [f"{q}/{name}" for li, name in enumerate(layer_names)
                         for q in ("flip_ratio", "c2i", self._tb_q[li], "threshold")]

    # ---------------- per step ----------------
    def float_positions(self, key: tuple, cols_per_layer: list[list[str]], device: torch.device) -> Tensor:
        """Flat positions in an [L, K_float] row of the given per-layer column lists (cached per key)."""
        if key not in self._pos_cache:
            k = len(self.FLOAT_COLUMNS)
            pos = [li * k + self.fpos[c] for li, cols in enumerate(cols_per_layer) for c in cols]
            self._pos_cache[key] = torch.tensor(pos, dtype=torch.int64, device=device)
        return self._pos_cache[key]

    def add_steps(self, step: int, ints: _Array, floats: _Array, hyper: np.ndarray,
                  hyper_identity: bool = False) -> None:
        """``ints`` int64 [L, 4] (INT_COLUMNS), ``floats`` float64 [L, K] (FLOAT_COLUMNS), ``hyper`` [L, 4]
        (γ, τ, lr, σ). CPU inputs are copied now; device tensors are kept until the drain. ``hyper_identity``:
        ``hyper`` is a new array whenever a value changes, as for :meth:`commit_step` (else values are compared)."""
        arrays = (ints, floats)
        if not self._steps.add(step, arrays, time.time()):
            self._drain_steps()
            self._steps.add(step, arrays, time.time())
        if not (hyper_identity and hyper is self._hyper_last):
            self._note_hyper(hyper, compare=not hyper_identity)

    def _note_hyper(self, hyper: np.ndarray, compare: bool = False) -> None:
        """The hyperparameters of the steps row just taken: a change point where they differ from the last one's.
        ``compare``: the caller may change its array in place (``add_steps``), so the next :meth:`commit_step`
        compares values again instead of trusting the array's identity."""
        h = np.array(hyper, dtype=np.float64)  # a copy: the caller's array may change later
        at = self._hyper_at
        if not at or not np.array_equal(h, at[-1][1], equal_nan=True):
            at.append((len(self._steps) - 1, h))
        self._hyper_last = None if compare else hyper

    def add_tracked(self, step: int, signs: _Array, inertia: _Array) -> None:
        """``inertia``: float64 [T, 2] = (inertia, step_size) per tracked weight ([T]: inertia only)."""
        if not self._tracked.add(step, (signs, inertia)):
            self._drain_tracked()
            self._tracked.add(step, (signs, inertia))

    def add_events(self, step: int, ints: _Array, inertia: _Array) -> None:
        """``inertia``: float64 [L·E, 2] = (inertia_before, step_size) per slot ([L·E]: inertia_before only)."""
        if not self._events.add(step, (ints, inertia)):
            self._drain_events()
            self._events.add(step, (ints, inertia))

    def buffer(self, kind: str) -> _Pending:
        """The pending rows of ``kind`` ("steps", "events", "tracked"). probe/lane.py reserves rows on them
        (``_Pending.reserve``: the addresses of the next row of each host buffer; steps: ints, floats), the compiled
        pass writes those rows in place, and :meth:`commit_step` takes them."""
        return self._kinds[kind]

    def commit_step(self, step: int, hyper: np.ndarray | None, events: bool, tracked: bool) -> None:
        """Take step ``step``'s reserved rows at once: the steps row with ``hyper`` [L, 4] (none when ``hyper`` is
        None), the flip events' and the tracked weights' where true (probe/lane.py, Probe._measure).

        ``hyper`` is compared with the last row's by identity: pass a new array when a value changes, never the
        same array changed in place (``Probe._hyper`` does so). Each step's row then costs no copy: a step
        hook's every numpy call costs microseconds once the training step has evicted the caches."""
        kinds = self._kinds
        if hyper is not None:
            pend = kinds["steps"]
            pend.commit(step, time.time())
            if hyper is not self._hyper_last:
                self._note_hyper(hyper)
        if events:
            kinds["events"].commit(step)
        if tracked:
            kinds["tracked"].commit(step)

    def add_hist(self, step: int, layer: int, quantity: str, counts: _Array, stats: _Array) -> None:
        if not _on_device(counts):
            counts, stats = np.array(_host(counts), dtype=np.int64), np.array(_host(stats), dtype=np.float64)
        self._hists.append((step, layer, quantity, counts, stats))

    def add_snapshot(self, step: int, layer: int, bits: _Array) -> None:
        n = int(bits.numel() if isinstance(bits, Tensor) else bits.size)
        packed = bits if _on_device(bits) else np.packbits(_host(bits), bitorder="big").tobytes()
        self._snaps.append((step, layer, n, packed))

    def add_train(self, step: int | None, epoch: int | None, scalars: dict[str, float]) -> None:
        """Training metrics: rows of the ``train`` table, and TensorBoard scalars at ``step`` (else ``epoch``)."""
        wall = time.time()
        for k, v in scalars.items():
            self._train_rows.append((step, epoch, k, float(v), wall))

    def pending(self) -> int:
        """Steps held in the buffers of the fullest kind (asked after every step: no per-kind method calls)."""
        s, k, e = self._steps, self._tracked, self._events
        return max(s.n + len(s.dev), k.n + len(k.dev), e.n + len(e.dev))

    # ---------------- buffers → host columns ----------------
    def drain(self) -> None:
        """Turn every pending step into host column arrays (one device → host copy per kind)."""
        if len(self._steps):
            self._drain_steps()
        if len(self._tracked):
            self._drain_tracked()
        if len(self._events):
            self._drain_events()
        if self._hists:
            self._drain_hists()
        if self._snaps:
            self._drain_snaps()

    def _drain_steps(self) -> None:
        steps, wall, (ints, floats) = self._steps.take()
        S, L = len(steps), self.L
        hyper = self._hyper_rows(S)
        ints = ints.reshape(S, L, len(self.INT_COLUMNS))
        floats = floats.reshape(S, L, len(self.FLOAT_COLUMNS))
        ratio = ints[:, :, 0] / self.n[None, :]
        # the running sum continues from the last drain in the same order of additions as one cumsum over the whole
        # run, so the column does not depend on when drains happen (flush timing)
        csum = np.cumsum(np.concatenate([self.run_sum[None, :], ratio]), axis=0)[1:]
        cnt = np.arange(1, S + 1)[:, None] + self.run_n[None, :]
        running = csum / cnt
        self.run_sum = csum[-1].copy()
        self.run_n = cnt[-1].copy()
        self._host["steps"].append({"step": steps, "ints": ints, "floats": floats, "hyper": hyper,
                                    "running": running})
        self._tb_steps(steps, wall, ints, floats, hyper)

    def _hyper_rows(self, S: int) -> np.ndarray:
        """[S, L, 4] hyperparameters of the S rows just taken (each change point's values up to the next one); the
        next pending row notes its own."""
        at, self._hyper_at, self._hyper_last = self._hyper_at, [], None
        if not at or at[0][0] != 0:  # (every steps row notes its hyperparameters: add_steps, commit_step)
            raise RuntimeError("bnn-probe recorder: steps rows without hyperparameters (a bnn-probe bug)")
        rows = np.array([r for r, _ in at])
        return np.stack([v for _, v in at])[np.searchsorted(rows, np.arange(S), side="right") - 1]

    def _steps_columns(self, chunks: list[dict[str, Any]]) -> dict[str, Any]:
        steps = np.concatenate([c["step"] for c in chunks])
        S, L = len(steps), self.L
        ints = np.concatenate([c["ints"] for c in chunks]).reshape(S * L, -1)
        floats = np.concatenate([c["floats"] for c in chunks]).reshape(S * L, -1).T  # [K, S·L]
        hyper = np.concatenate([c["hyper"] for c in chunks]).reshape(S * L, -1).T
        n = np.tile(self.n, S)
        h = ints[:, 3]
        cols: dict[str, Any] = {
            "step": np.repeat(steps, L), "layer": string_column(np.tile(np.arange(L), S), self.names),
            "flips": ints[:, 0].copy(), "flip_ratio": ints[:, 0] / n,
            "flip_ratio_running": np.concatenate([c["running"] for c in chunks]).reshape(-1),
            "c2i": 1.0 - ints[:, 1] / n, "c2i_corr": 1.0 - 2.0 * ints[:, 1] / n,  # 2·c2i − 1
            "c2i_diff": ints[:, 1].copy(), "nonfinite_grads": ints[:, 2].copy(),
            "sign_hash": nullable_int(np.where(h == MISSING_INT, 0, h), h == MISSING_INT),
        }
        for j, c in enumerate(_HYPER):
            cols[c] = np.ascontiguousarray(hyper[j])
        for j, c in enumerate(self.FLOAT_COLUMNS):
            cols[c] = np.ascontiguousarray(floats[j])
        return cols

    def _tb_steps(self, steps: np.ndarray, wall: np.ndarray, ints: np.ndarray, floats: np.ndarray,
                  hyper: np.ndarray) -> None:
        """Per step and layer: flip_ratio, c2i, the magnitude median (abs_m_q50 / abs_w_q50) and τ (the last two
        only where not NaN) — one event per step (``tb_every`` thins the steps)."""
        tb = self.writer.tb
        if tb is None or self.L == 0:
            return
        if self.tb_every is not None:
            sel = np.fromiter((bool(self.tb_every(int(s))) for s in steps), dtype=bool, count=len(steps))
            steps, wall, ints, floats, hyper = steps[sel], wall[sel], ints[sel], floats[sel], hyper[sel]
            if not len(steps):
                return
        S, L = len(steps), self.L
        vals = np.empty((S, L, 4))
        vals[:, :, 0] = ints[:, :, 0] / self.n[None, :]
        vals[:, :, 1] = 1.0 - ints[:, :, 1] / self.n[None, :]
        vals[:, :, 2] = floats[:, np.arange(L), [self.fpos[q] for q in self._tb_q]]
        vals[:, :, 3] = hyper[:, :, 1]  # the layer's τ in force (Bop families; NaN for latent)
        keep = np.ones((S, L, 4), dtype=bool)
        keep[:, :, 2:] = vals[:, :, 2:] == vals[:, :, 2:]
        tb.add_scalars_bulk(self._tb_tags, steps, vals.reshape(S, -1), keep.reshape(S, -1), walltime=wall)

    def _drain_tracked(self) -> None:
        steps, _, (signs, floats) = self._tracked.take()
        S, T = signs.shape
        self._host["tracked"].append({"step": steps, "signs": signs, "floats": floats})

    def _tracked_columns(self, chunks: list[dict[str, Any]]) -> dict[str, Any]:
        steps = np.concatenate([c["step"] for c in chunks])
        signs = np.concatenate([c["signs"] for c in chunks])
        if signs.dtype == np.bool_:  # the probe hands over sign(w) ≥ 0 as bool; written as ±1
            signs = np.where(signs, 1, -1).astype(np.int8)
        inertia, step_size = _split_floats(np.concatenate([c["floats"] for c in chunks]))
        S, T = signs.shape
        layer = np.concatenate([np.full(len(idx), li) for li, (_, idx) in enumerate(self.track_layout)])
        index = np.concatenate([idx for _, idx in self.track_layout]).astype(np.int64)
        return {"step": np.repeat(steps, T), "layer": string_column(np.tile(layer, S), self.names),
                "index": np.tile(index, S), "sign": signs.reshape(-1).astype(np.int8),
                "inertia": np.ascontiguousarray(inertia).reshape(-1),
                "step_size": np.ascontiguousarray(step_size).reshape(-1)}

    def _drain_events(self) -> None:
        steps, _, (ints, floats) = self._events.take()
        self._host["events"].append({"step": steps, "ints": ints, "floats": floats})

    def _events_columns(self, chunks: list[dict[str, Any]]) -> dict[str, Any]:
        """Occupied slots (index ≥ 0), each (step, layer, index) once (the first slot holding it)."""
        steps = np.concatenate([c["step"] for c in chunks])
        ints = np.concatenate([c["ints"] for c in chunks])  # [S, L·E, 2]
        inertia, step_size = _split_floats(np.concatenate([c["floats"] for c in chunks]))  # [S, L·E] each
        S, LE, _ = ints.shape
        e = self.events_per_layer
        idx = ints[:, :, 0]
        keep = idx >= 0
        if e > 0 and LE == self.L * e:  # a repeated index within one step's layer block: keep its first slot
            blk = idx.reshape(S, self.L, e)
            order = np.argsort(blk, axis=-1, kind="stable")
            srt = np.take_along_axis(blk, order, -1)
            dup_sorted = np.zeros(blk.shape, dtype=bool)
            dup_sorted[..., 1:] = srt[..., 1:] == srt[..., :-1]
            dup = np.empty_like(dup_sorted)
            np.put_along_axis(dup, order, dup_sorted, -1)
            keep &= ~dup.reshape(S, LE)
        layer = np.tile(np.repeat(np.arange(self.L), e), S)
        k = keep.reshape(-1)
        since = ints[:, :, 1].reshape(-1)[k]
        return {"step": np.repeat(steps, LE)[k], "layer": string_column(layer[k], self.names),
                "index": idx.reshape(-1)[k], "inertia_before": inertia.reshape(-1)[k],
                "steps_since_last_flip": nullable_int(np.where(since < 0, 0, since), since < 0),
                "step_size": step_size.reshape(-1)[k]}

    def _drain_hists(self) -> None:
        batch, self._hists = self._hists, []
        dev = [b for b in batch if isinstance(b[3], Tensor)]
        if dev:  # one device → host copy for all of them
            counts = torch.cat([b[3].reshape(-1) for b in dev]).cpu().numpy()
            stats = torch.stack([b[4] for b in dev]).cpu().numpy()
            host, off = [], 0
            for k, b in enumerate(dev):
                host.append((b[0], b[1], b[2], counts[off:off + b[3].numel()], stats[k]))
                off += b[3].numel()
            it = iter(host)
            batch = [next(it) if isinstance(b[3], Tensor) else b for b in batch]
        tb = self.writer.tb
        steps, layers, quants, bins, cnts = [], [], [], [], []
        for step, li, q, cnt, st in batch:
            edges = HIST_EDGES[q]
            left = np.concatenate([[-math.inf], edges])
            right = np.concatenate([edges, [math.inf]])
            nz = np.nonzero(cnt)[0]
            steps.append(np.full(len(nz), step, dtype=np.int64))
            layers.append(np.full(len(nz), li))
            quants.append(np.full(len(nz), HIST_QUANTITIES.index(q)))
            bins.append(nz)
            cnts.append(cnt[nz].astype(np.int64))
            if tb is not None and len(nz):
                mn, mx, sm, sq = (float(x) for x in st)
                lim = right[nz].copy()
                if math.isinf(lim[-1]):
                    lim[-1] = max(mx, left[nz[-1]])
                tb.add_histogram_raw(f"{q}/{self.names[li]}", min=mn, max=mx, num=int(cnt.sum()), sum=sm,
                                     sum_squares=sq, bucket_limits=lim.tolist(), bucket_counts=cnt[nz].tolist(),
                                     global_step=int(step))
        if batch:
            b = np.concatenate(bins).astype(np.int64)
            q = np.concatenate(quants)
            self._host["hists"].append({"step": np.concatenate(steps), "layer": np.concatenate(layers), "quantity": q,
                                        "bin": b, "count": np.concatenate(cnts)})

    def _hists_columns(self, chunks: list[dict[str, Any]]) -> dict[str, Any]:
        q = np.concatenate([c["quantity"] for c in chunks])
        b = np.concatenate([c["bin"] for c in chunks])
        left, right = np.empty(len(b)), np.empty(len(b))
        for k, name in enumerate(HIST_QUANTITIES):
            m = q == k
            if m.any():
                edges = np.asarray(HIST_EDGES[name], dtype=np.float64)
                left[m] = np.concatenate([[-math.inf], edges])[b[m]]
                right[m] = np.concatenate([edges, [math.inf]])[b[m]]
        return {"step": np.concatenate([c["step"] for c in chunks]),
                "layer": string_column(np.concatenate([c["layer"] for c in chunks]), self.names),
                "quantity": string_column(q, list(HIST_QUANTITIES)), "bin": b, "left": left, "right": right,
                "count": np.concatenate([c["count"] for c in chunks])}

    def _drain_snaps(self) -> None:
        batch, self._snaps = self._snaps, []
        self._host["snapshots"].append({"rows": [
            {"step": s, "layer": self.names[li], "n_weights": n,
             "signs": p if isinstance(p, bytes) else np.packbits(p.cpu().numpy(), bitorder="big").tobytes()}
            for s, li, n, p in batch]})

    # ---------------- host → disk ----------------
    def flush(self) -> None:
        """Drain and write every pending row as new parts, and the TensorBoard records."""
        self.drain()
        train = self._train_columns()
        build = {"steps": self._steps_columns, "tracked": self._tracked_columns, "events": self._events_columns,
                 "hists": self._hists_columns,
                 "snapshots": lambda ch: pd.DataFrame([r for c in ch for r in c["rows"]])}
        for table, chunks in self._host.items():
            if chunks:
                self._host[table] = []
                self.writer.append(table, build[table](chunks))
        if train is not None:
            self.writer.append("train", train)
        self.writer.flush_tb()

    def _train_columns(self) -> dict[str, Any] | None:
        """The pending ``train`` rows as columns; their TensorBoard scalars (one series per name, at the step, else
        the epoch, else 0) go to the event writer."""
        if not self._train_rows:
            return None
        rows, self._train_rows = self._train_rows, []
        steps, epochs, name_of_row, values, walls = (np.array(c, dtype=object) for c in zip(*rows, strict=True))
        s_null, e_null = np.equal(steps, None), np.equal(epochs, None)
        step = np.where(s_null, 0, steps).astype(np.int64)
        epoch = np.where(e_null, 0, epochs).astype(np.int64)
        value = values.astype(np.float64)
        uniq, codes = np.unique(name_of_row, return_inverse=True)
        names = [str(n) for n in uniq]
        tb = self.writer.tb
        if tb is not None:
            x = np.where(~s_null, step, np.where(~e_null, epoch, 0))
            wall = walls.astype(np.float64)
            for k, name in enumerate(names):
                m = codes == k
                tb.add_scalars_bulk([name], x[m], value[m, None], walltime=wall[m])
        return {"step": nullable_int(step, s_null), "epoch": nullable_int(epoch, e_null),
                "name": string_column(codes, names), "value": value}

    def write_weight_flips(self, step: int, counts: list[Tensor | None],
                           hists: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
        """weight_flips.parquet: for each layer and k, the number of weights that flipped exactly k times — from
        ``hists[i]`` where given (a histogram kept flip by flip, probe/onepass.py), else a bincount of the layer's
        counters ``counts[i]``. Returns every layer's histogram (numpy int64)."""
        if not counts:
            return []
        hists = list(hists) if hists is not None else [None] * len(counts)  # (the caller's list stays as given)
        # bincount takes the counters' own integer type: no int64 copy of every weight's counter at each flush
        todo = [i for i, h in enumerate(hists) if h is None]
        made = [torch.bincount(c if c.dtype in _BINCOUNT_TYPES else c.to(torch.int64))
                for c in (counts[i] for i in todo)]
        if made:
            flat_made = torch.cat(made).cpu().numpy().astype(np.int64, copy=False)
            pos = np.cumsum([0] + [b.numel() for b in made])
            for j, i in enumerate(todo):
                hists[i] = flat_made[pos[j]:pos[j + 1]]
        bins: list[np.ndarray] = hists  # type: ignore[assignment]
        sizes = [len(b) for b in bins]
        flat = np.concatenate(bins)
        layer = np.repeat(np.arange(len(sizes)), sizes)
        k = np.concatenate([np.arange(sz) for sz in sizes])
        nz = flat != 0
        self.writer.write_table("weight_flips", {
            "step": np.full(int(nz.sum()), step, dtype=np.int64), "layer": string_column(layer[nz], self.names),
            "flips_per_weight": k[nz].astype(np.int64), "n": flat[nz].astype(np.int64)})
        return bins
