"""``attach`` and :class:`Probe`: optimizer step hooks that measure the binary weights and write the run log.

Two lines in any training loop::

    probe = bnn_probe.attach(model, optimizer, "runs/x")
    for x, y in data:
        ...; optimizer.step()           # the probe measures after every step
        probe.log(loss=loss.item())     # optional training metrics
    probe.close()

The pre-step hook remembers sign(w_{t−1}) (latent layers: w̃_{t−1}); the post-step hook measures on the device,
appends to device buffers, and every ``flush_every_steps`` steps or ``flush_secs`` seconds writes Parquet parts.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import platform
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..runlog.schema import FORMAT, HIST_EDGES, SCHEMA_VERSION
from ..runlog.writer import RunWriter, now_iso
from .binarizers import BinarizerSpec
from .binary_detect import BOP_FAMILIES, BinarySpec, LayerInfo, leaf_optimizers, resolve_layers
from .checks import RunChecks
from .flat import FlatGroup, group_layers, plain_values
from .lane import Lane
from .quantities import QUANTILES
from .recorder import Recorder
from .schedules import Schedule, as_schedule

__all__ = ["Probe", "attach"]

Cadence = int | Schedule | Callable[[int], bool] | None
_HYPER_KEYS = ("gamma", "threshold", "lr", "sigma")
_SCHEDULE_BLOCK = 256  # steps whose cadences are asked at once (pure schedules: Probe._schedule)


class _CadenceAttr:
    """A cadence of the probe (``every``, ``hist_every``, ...): stored as a :class:`Schedule` (an int n or a
    callable is converted as ``attach`` does); setting it drops the steps whose schedule was asked ahead."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = "_" + name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else obj.__dict__[self.key]

    def __set__(self, obj: Any, value: Cadence) -> None:
        obj.__dict__[self.key] = as_schedule(value)
        obj.__dict__["_sched_block"] = ()


def _hyper_keys(ly: LayerInfo) -> tuple[str, ...]:
    """The param-group keys of (γ, τ, lr, σ) for a layer (a third-party Bop names its own γ and τ keys)."""
    return (ly.extra.get("gamma_key", "gamma"), ly.extra.get("threshold_key", "threshold"), "lr", "sigma")


def _dist_rank_world(rank: int | None) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if rank is None:
            rank = torch.distributed.get_rank()
    if rank is None:  # torchrun, attached before init_process_group: only RANK 0 may write
        rank = int(os.environ.get("RANK", "0"))
    return int(rank), world


def _jsonable(v: Any) -> Any:
    if isinstance(v, bool | int | str) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _jsonable(v.item())
    return repr(v)


def _sample_indices(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=gen)[:k].sort().values


class Probe:
    """Measures the binary weights at every optimizer step and writes the run log (see :func:`attach`)."""

    every = _CadenceAttr()
    hist_every = _CadenceAttr()
    snapshot_every = _CadenceAttr()
    track_every = _CadenceAttr()
    events_every = _CadenceAttr()
    quantile_every = _CadenceAttr()

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, logdir: str | os.PathLike,
                 binary: BinarySpec = None, every: Cadence = 1, hist_every: Cadence = 100,
                 snapshot_every: Cadence = 1000, track: int = 64, track_every: Cadence = 1,
                 events_per_layer: int = 16, events_every: Cadence = None, quantile_sample: int = 4096,
                 quantile_every: Cadence = 10,
                 flush_every_steps: int = 1000, flush_secs: float = 10.0, tensorboard: bool = True,
                 tb_every: Cadence = None, config: dict | None = None, tag: str | None = None,
                 rank: int | None = None, resume: bool = False, seed: int = 0, sign_hash: bool = True,
                 buffer_steps: int = 256, compile_probe: bool | None = None,
                 device_path: bool | None = None, cuda_graphs: bool | None = None, binarizer: BinarizerSpec = None,
                 family: str | None = None,
                 momentum_key: str | None = None, threshold_key: str | None = None, gamma_key: str | None = None,
                 check_every: Cadence = 100) -> None:
        self.model = model
        self.optimizer = optimizer
        self.logdir = os.fspath(logdir)
        self.layers: list[LayerInfo] = resolve_layers(model, optimizer, binary, binarizer=binarizer, family=family,
                                                      momentum_key=momentum_key, threshold_key=threshold_key,
                                                      gamma_key=gamma_key)
        self.check_every = as_schedule(check_every)
        self.rank, self.world_size = _dist_rank_world(rank)
        self.active = self.rank == 0
        self.step = 0
        self._sched_block: list[tuple] | tuple = ()  # Probe._schedule of steps _sched_t0, _sched_t0 + 1, ...
        self._sched_t0 = 0
        self.every = as_schedule(every)
        self.hist_every = as_schedule(hist_every)
        self.snapshot_every = as_schedule(snapshot_every)
        self.track = int(track)
        self.track_every = as_schedule(track_every if self.track > 0 else 0)
        self.events_per_layer = int(events_per_layer)
        self.events_every = as_schedule(every if events_every is None else events_every) \
            if self.events_per_layer > 0 else as_schedule(0)
        self.tb_every = as_schedule(tb_every) if tb_every is not None else None
        self.quantile_sample = int(quantile_sample)
        self.quantile_every = as_schedule(quantile_every)
        self.flush_every_steps = int(flush_every_steps)
        self.flush_secs = float(flush_secs)
        self.seed = int(seed)
        self.sign_hash = bool(sign_hash)
        self.config = dict(config or {})
        self.tag = tag
        dev0 = self.layers[0].param.device
        self.compile_probe = dev0.type == "cuda" if compile_probe is None else bool(compile_probe)
        self.device_path = self.compile_probe or (dev0.type != "cpu" if device_path is None else bool(device_path))
        self.cuda_graphs = cuda_graphs
        self.status = "running"
        self._closed = False
        self._callbacks: list[tuple[Schedule, Callable[[Probe, int], None]]] = []
        self._handles: list[Any] = []
        self.interventions: list[dict[str, Any]] = _previous_interventions(self.logdir) if resume else []
        if self.active:
            self._setup_writer(tensorboard, resume, buffer_steps)
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook))
        self._handles.append(optimizer.register_step_post_hook(self._post_hook))
        optimizer.__dict__.setdefault("bnn_probes", weakref.WeakSet()).add(self)  # bnn_probe.interventions finds it
        if self.world_size > 1:  # cross-rank sign-hash check on the hist_every schedule (probe/distributed.py)
            from .distributed import install_rank_check

            install_rank_check(self)
        if self.active:
            atexit.register(_flush_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ setup
    def _setup_writer(self, tensorboard: bool, resume: bool, buffer_steps: int) -> None:
        # (leaf optimizer, index of the layer's param group, keys): LayerInfo.group, read without the property
        self._hyper_src = [(ly.optimizer, ly.extra["leaf_group"], _hyper_keys(ly)) for ly in self.layers]
        self._hyper_raw: list | None = None
        self._hyper_plain = False
        self._lane: Lane | None = None  # one Bop-family group whose rows the pass writes in place
        gen = torch.Generator().manual_seed(self.seed)
        q_idx: list[torch.Tensor | None] = []
        t_idx: list[torch.Tensor] = []
        for layer in self.layers:  # the same draws, in the same order, as ever: samples are part of the log
            n = layer.n
            q_idx.append(None if n <= self.quantile_sample else _sample_indices(n, self.quantile_sample, gen))
            t_idx.append(_sample_indices(n, self.track, gen))
        dev = self.layers[0].param.device
        self._event_gen = torch.Generator(device=dev).manual_seed(self.seed + 1)
        self.groups: list[FlatGroup] = []
        for rows in group_layers(self.layers):
            grp = FlatGroup([self.layers[i] for i in rows], rows, [q_idx[i] for i in rows], [t_idx[i] for i in rows],
                            self.optimizer, self.sign_hash, self.events_per_layer, Recorder.FLOAT_COLUMNS,
                            device_path=self.device_path, compile_probe=self.compile_probe,
                            cuda_graphs=self.cuda_graphs)
            grp.gen = self._event_gen if grp.device == dev else torch.Generator(device=grp.device).manual_seed(
                self.seed + 1)
            self.groups.append(grp)
        for grp in self.groups:  # a generator with one user may be drawn ahead (probe/onepass.py, Uniforms)
            grp.gen_shared = sum(g2.gen is grp.gen for g2 in self.groups) > 1
        self._dev = dev
        order = [i for g in self.groups for i in g.rows]
        L = len(self.layers)
        self._perm = None if order == list(range(L)) else torch.tensor(np.argsort(order), device=dev)
        if self._perm is not None:  # tracked rows: group order → layer order
            sizes = {i: g.t_sizes[k] for g in self.groups for k, i in enumerate(g.rows)}
            starts, off = {}, 0
            for i in order:
                starts[i] = off
                off += sizes[i]
            self._tperm = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in range(L)]).to(dev)
            e = self.events_per_layer
            self._eperm = torch.cat([torch.arange(order.index(i) * e, order.index(i) * e + e)
                                     for i in range(L)]).to(dev)
        self.writer = RunWriter(self.logdir, tensorboard=tensorboard, resume=resume)
        self.run_id = _previous_run_id(self.writer.path) if resume else None
        self.run_id = self.run_id or uuid.uuid4().hex  # identifies the run: a resume checks its checkpoint's
        self.rec = Recorder(self.writer, [ly.name for ly in self.layers], [ly.n for ly in self.layers],
                            [ly.family for ly in self.layers], buffer_steps=buffer_steps, tb_every=self.tb_every)
        self.rec.events_per_layer = self.events_per_layer
        self._set_track_layout()
        self._set_lane()
        self.created_at = now_iso()
        self._last_flush_step = 0
        self._last_flush_time = time.monotonic()
        self.checks = RunChecks(self.layers, self.groups, self.check_every)
        if resume:  # the earlier segment's warnings stay in meta.json
            try:
                with open(os.path.join(self.logdir, "meta.json"), encoding="utf-8") as f:
                    self.checks.restore(json.load(f).get("warnings"))
            except (OSError, ValueError, AttributeError):
                pass
        self.checks.at_attach(self.model)
        self.writer.write_table("layers", self._layers_frame())
        self._write_meta()

    def _layer_state(self, i: int) -> tuple[FlatGroup, int]:
        for g in self.groups:
            if i in g.rows:
                return g, g.rows.index(i)
        raise KeyError(i)

    def _set_track_layout(self) -> None:
        self.rec.track_layout = []
        off = 0
        for i in range(len(self.layers)):
            g, k = self._layer_state(i)
            idx = g.t_idx[k].cpu().numpy()
            self.rec.track_layout.append((off, idx))
            off += len(idx)

    def _layers_frame(self) -> pd.DataFrame:
        rows = []
        for ly in self.layers:
            fi, fo = ly.fans
            g = ly.group
            keys = _hyper_keys(ly)
            rows.append({"layer": ly.name, "fan_in": fi, "fan_out": fo, "n_weights": ly.n, "shape": ly.shape,
                         "module_type": ly.module_type, "group": ly.group_index, "family": ly.family,
                         **{k: float(g[gk]) if isinstance(g.get(gk), int | float) else math.nan
                            for k, gk in zip(_HYPER_KEYS, keys, strict=True)},
                         "optimizer": type(ly.optimizer).__name__, "layer_index": ly.index,
                         "binarizer": ly.binarizer.describe(), "source": ly.source})
        return pd.DataFrame(rows)

    def _meta(self) -> dict[str, Any]:
        import bnn_probe

        fams = sorted({ly.family for ly in self.layers})
        groups = []
        gi = 0
        for leaf in leaf_optimizers(self.optimizer):
            for g in leaf.param_groups:
                groups.append({"index": gi, "optimizer": type(leaf).__name__, "n_params": len(g["params"]),
                               **{k: _jsonable(v) for k, v in g.items() if k != "params"}})
                gi += 1
        n_bin = sum(ly.n for ly in self.layers)
        probe_opts = {
            "every": self.every.to_dict(), "hist_every": self.hist_every.to_dict(),
            "snapshot_every": self.snapshot_every.to_dict(), "track": self.track,
            "track_every": self.track_every.to_dict(), "events_per_layer": self.events_per_layer,
            "events_every": self.events_every.to_dict(), "quantile_sample": self.quantile_sample,
            "quantile_every": self.quantile_every.to_dict(),
            "quantiles": list(QUANTILES), "flush_every_steps": self.flush_every_steps, "flush_secs": self.flush_secs,
            "seed": self.seed, "sign_hash": self.sign_hash, "compile_probe": self.compile_probe,
            "device_path": self.device_path,
            "cuda_graphs": any(g.graphs is not None and g.graphs.capture for g in getattr(self, "groups", ())),
            "tb_every": self.tb_every.to_dict() if self.tb_every else None, "hist_edges": HIST_EDGES,
            "check_every": self.check_every.to_dict(),
            "optimizer_keys": {ly.name: {k: ly.extra[k] for k in ("momentum_key", "threshold_key", "gamma_key")}
                               for ly in self.layers if ly.family in BOP_FAMILIES},
        }
        return {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "bnn_probe_version": bnn_probe.__version__,
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "status": self.status, "created_at": self.created_at, "updated_at": now_iso(),
            "finished_at": now_iso() if self.status != "running" else None, "last_step": self._last_flush_step,
            "family": fams[0] if len(fams) == 1 else "mixed",
            "optimizer": {"class": type(self.optimizer).__name__, "groups": groups},
            "model": {"class": type(self.model).__name__, "n_binary_weights": n_bin,
                      "n_parameters": sum(p.numel() for p in self.model.parameters())},
            "layers": [ly.name for ly in self.layers], "device": str(self.layers[0].param.device),
            "probe": probe_opts, "config": self.config, "tag": self.tag, "world_size": self.world_size,
            "run_id": self.run_id,
            "warnings": list(self.checks.warnings) if hasattr(self, "checks") else [],
            "interventions": self.interventions,
        }

    def _write_meta(self) -> None:
        self.writer.write_meta(self._meta())

    # ------------------------------------------------------------------ hooks
    def _set_lane(self) -> None:
        """One group of the Bop family measured by the compiled pass (the usual model): its C calls then write each
        step's rows straight into the recorder's buffers and the hooks take them (probe/lane.py); the probe copies
        nothing."""
        op = getattr(self.groups[0], "onepass", None) if len(self.groups) == 1 else None
        self._lane = Lane(op, self.rec) if op is not None and op.fast and op.bop and self.active else None

    def _schedule(self, t: int) -> tuple[int, bool, bool, bool, bool, bool, bool, bool]:
        """(t, log, track, events, hist, snapshot, quantiles, check): what step t records. The cadences are asked
        256 steps ahead at once when all are pure (the built-in schedules), else at step t only; either way each
        is asked once per step (both hooks read the same answer)."""
        k = t - self._sched_t0
        blk = self._sched_block
        if 0 <= k < len(blk):
            return blk[k]
        cads = (self.every, self.track_every, self.events_every, self.hist_every, self.snapshot_every,
                self.quantile_every, self.checks.schedule)
        n = _SCHEDULE_BLOCK if all(getattr(c, "pure", False) for c in cads) else 1
        every, track, events, hist, snap, quant, check = cads
        blk = []
        for u in range(t, t + n):
            log = bool(every(u))
            blk.append((u, log, bool(track(u)), bool(events(u)), bool(hist(u)), bool(snap(u)), log and bool(quant(u)),
                        bool(check(u))))
        self._sched_block, self._sched_t0 = blk, t
        return blk[0]

    def _pre_hook(self, optimizer, args, kwargs) -> None:
        checks = self.checks
        if checks.pending_change:  # (the step after a check step)
            checks.pre_step()
        t = self.step + 1
        _, log, trk, ev, _, _, quant, _ = self._schedule(t)
        lane = self._lane
        if lane is not None:  # the pass writes the step's rows into the recorder's buffers (probe/lane.py)
            lane.pre(t, log, ev and self.events_per_layer > 0, trk, quant)
            return
        tail = (int(ev) | int(trk) << 1) if self.active else 0
        for g in self.groups:
            g.before_step(t, quant, tail)

    def _post_hook(self, optimizer, args, kwargs) -> None:
        self.step += 1
        t = self.step
        if self.active:
            lane = self._lane
            _, log, trk, ev, hist, snap, quant, check = self._schedule(t)
            if lane is None or hist or snap or \
                    not lane.post(t, log, ev and self.events_per_layer > 0, trk, quant, self._hyper):
                self._measure(t)
            if check:
                self.checks.post_step(t, due=True)
        for sched, fn in self._callbacks:
            if sched(t):
                fn(self, t)
        if self.active:
            if self.rec.pending() >= self.rec.buffer_steps:
                self.rec.drain()
            if t - self._last_flush_step >= self.flush_every_steps or \
                    time.monotonic() - self._last_flush_time >= self.flush_secs:
                self.flush()

    def _cat(self, parts: list[torch.Tensor | np.ndarray], perm: torch.Tensor | None) -> torch.Tensor | np.ndarray:
        """One group's result as it is (tensor or numpy buffer: the recorder copies it), several concatenated in
        group order and put in layer order."""
        if len(parts) == 1:
            return parts[0]
        x = torch.cat([torch.from_numpy(p).to(self._dev) if isinstance(p, np.ndarray) else p.to(self._dev)
                       for p in parts])
        return x if perm is None else x.index_select(0, perm)

    def _pair(self, outs: list[dict], key: str, perm: torch.Tensor | None) -> tuple:
        """Both arrays of the groups' ``key`` output ("events", "tracked"), each as one in layer order."""
        return tuple(self._cat([o[key][j] for o in outs], perm) for j in (0, 1))

    def _measure(self, t: int) -> None:
        _, log, trk, ev, hist, snap, quant, _ = self._schedule(t)
        outs = [g.measure(t, log, trk, ev, hist, snap, quant) for g in self.groups]
        rec = self.rec
        # rows the compiled pass wrote straight into the recorder's buffers (routed by the lane's pre-step call)
        lane = self._lane
        _, in_rows, in_events, in_tracked = lane.routed if lane is not None and lane.routed[0] == t else \
            (t, False, False, False)
        ev = ev and self.events_per_layer > 0
        hyper = self._hyper() if log else None
        if log and not in_rows:
            ints = self._cat([o["ints"] for o in outs], self._perm)
            floats = self._cat([o["floats"] for o in outs], self._perm)
            rec.add_steps(t, ints, floats, hyper, hyper_identity=True)  # (Probe._hyper: a new array on a change)
        if ev and not in_events:
            rec.add_events(t, *self._pair(outs, "events", getattr(self, "_eperm", None)))
        if trk and not in_tracked:
            rec.add_tracked(t, *self._pair(outs, "tracked", getattr(self, "_tperm", None)))
        rec.commit_step(t, hyper if log and in_rows else None, ev and in_events, trk and in_tracked)
        for g, o in zip(self.groups, outs, strict=True):
            for q, (cnt, stats, rows) in o.get("hists", {}).items():
                for k in rows:
                    rec.add_hist(t, g.rows[k], q, cnt[k], stats[k])
            if snap:
                for k, li in enumerate(g.rows):
                    rec.add_snapshot(t, li, g.layer_slice(o["snap"], k))

    def _hyper(self) -> np.ndarray:
        """[L, 4] float64 (γ, τ, lr, σ) of every layer as its param group holds them now (NaN where absent or not a
        number); rebuilt only when one of the raw values changed (a scheduler)."""
        # the group looked up each step (groups may be replaced); one comprehension: this runs every step
        raw = [g.get(k) for opt, gi, keys in self._hyper_src for g in (opt.param_groups[gi],) for k in keys]
        if not self._hyper_plain or raw != self._hyper_raw:
            out = np.full((len(self.layers), 4), math.nan)
            for i, v in enumerate(raw):
                if isinstance(v, int | float):
                    out.flat[i] = v
                elif isinstance(v, torch.Tensor) and v.numel() == 1 and v.device.type == "cpu":
                    out.flat[i] = float(v)
            self._hyper_raw, self._hyper_arr = raw, out
            self._hyper_plain = plain_values(raw)  # else re-read every step
        return self._hyper_arr  # a new array whenever a value changed (Recorder.commit_step compares identity)

    # ------------------------------------------------------------------ public API
    def add_callback(self, fn: Callable[[Probe, int], None], every: Cadence = 1) -> None:
        """Call ``fn(probe, step)`` after the steps ``every`` selects, on every rank (e.g. a cross-rank check).
        The every-step path adds no synchronisation; a callback that needs one should use a sparse schedule."""
        self._callbacks.append((as_schedule(every), fn))

    def log(self, step: int | None = None, epoch: int | None = None, **scalars: float) -> None:
        """Training metrics (loss=…, accuracy=…) for the ``train`` table; ``step`` defaults to :attr:`step`."""
        if not self.active or self._closed:
            return
        self.rec.add_train(self.step if step is None else int(step), None if epoch is None else int(epoch), scalars)

    def before_edit(self) -> None:
        """Call before changing binary weights or their optimizer state between two steps (as
        :func:`bnn_probe.interventions.reset_inertia` does): the next step's measurement then compares with the
        values before the change, exactly as without bnn_probe's fused Bop step (docs/quantities.md)."""
        for g in self.groups:
            if getattr(g, "onepass", None) is not None:
                g.onepass.edit()

    def mark_intervention(self, kind: str, step: int | None = None, **info: Any) -> None:
        """Record an intervention on the optimization (e.g. :func:`bnn_probe.interventions.reset_inertia`) made after
        optimizer step ``step`` (default: the current step) in ``meta.json`` → ``interventions`` (written now)."""
        entry = {"step": self.step if step is None else int(step), "kind": str(kind),
                 **{k: _jsonable(v) for k, v in info.items()}}
        self.interventions = [e for e in self.interventions if (e.get("step"), e.get("kind")) !=
                              (entry["step"], entry["kind"])] + [entry]  # a resumed run may redo a step
        if self.active and not self._closed:
            self.checks.declared_change()  # a declared change between steps is not `changed_outside_step`
            self._write_meta()

    def flush(self) -> None:
        """Write every pending row now (new Parquet parts, weight_flips.parquet, meta.json)."""
        if not self.active:
            return
        self.rec.flush()
        self.writer.append("scales", self.checks.evaluate())
        self._write_weight_flips()
        self._last_flush_step = self.step
        self._last_flush_time = time.monotonic()
        self._write_meta()

    def _write_weight_flips(self) -> None:
        """weight_flips.parquet: the compiled pass's histograms where it keeps them (no pass over the counters),
        else a bincount of the counters, which then re-seeds the pass's histogram."""
        where = [self._layer_state(i) for i in range(len(self.layers))]
        ops = [getattr(g, "onepass", None) for g, _ in where]
        hists = [None if op is None else op.flip_hist(k) for op, (_, k) in zip(ops, where, strict=True)]
        counts = [g.layer_slice(g.count, k) for g, k in where]
        bins = self.rec.write_weight_flips(self.step, counts, hists)
        for op, (_, k), h, b in zip(ops, where, hists, bins, strict=True):
            if op is not None and h is None:
                op.set_flip_hist(k, b)

    def close(self, status: str = "finished") -> None:
        """Flush, mark the run ``status`` ("finished" or "failed"), remove the hooks. Safe to call twice."""
        if self._closed:
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for g in getattr(self, "groups", []):  # a request left by a step that never ran (an exception in between)
            if getattr(g, "onepass", None) is not None:
                g.onepass.withdraw()
            if getattr(g, "graphs", None) is not None:  # their memory pools go back to the allocator
                g.graphs.release()
        if hasattr(self, "checks"):
            self.checks.remove()
        if self.active:
            self.status = status
            try:
                self.flush()
            finally:
                self.writer.close()
        self._closed = True

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close("failed" if exc_type is not None else "finished")
        return False

    def state_dict(self) -> dict[str, Any]:
        """Step counter, per-weight counters and masks, sample indices, RNG state, running means (CPU tensors)."""
        sd: dict[str, Any] = {"version": 1, "step": self.step, "seed": self.seed}
        if self.active:
            self.rec.drain()  # running means are accumulated on the host at drain time
            layers = {}
            for i, ly in enumerate(self.layers):
                g, k = self._layer_state(i)
                st = g.layer_state(k)
                cpu = {name: (None if v is None else v.detach().cpu().clone()) for name, v in (
                    *((n, st[n]) for n in g.STATE_NAMES), ("q_idx", g.q_idx[k]), ("t_idx", g.t_idx[k]))}
                layers[ly.name] = cpu
            sd["layers"] = layers
            sd["run_sum"] = self.rec.run_sum.tolist()
            sd["run_n"] = self.rec.run_n.tolist()
            sd["event_gen"] = self._event_gen_state()
        return sd

    def _event_gen_state(self) -> torch.Tensor:
        """The event generator's state as if only the uniforms used so far had been drawn (a group may draw ahead:
        probe/onepass.py, Uniforms)."""
        for g in self.groups:
            op = getattr(g, "onepass", None)
            if op is not None and op.unif is not None and g.gen is self._event_gen:
                return op.unif.generator_state()
        return self._event_gen.get_state()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (for a resumed run; attach with ``resume=True`` to append to its log)."""
        self.step = int(sd["step"])
        if not self.active or "layers" not in sd:
            return
        for ly in self.layers:
            if ly.name not in sd["layers"]:
                from ..errors import BnnProbeError

                raise BnnProbeError(f"probe state has no layer {ly.name!r}: is it from another model?")
        for g in self.groups:
            q_idx, t_idx = [], []
            for k, ly in enumerate(g.layers):
                st = sd["layers"][ly.name]
                for name in g.STATE_NAMES:
                    if st.get(name) is not None:
                        g.load_layer_state(k, name, st[name])
                q_idx.append(st.get("q_idx"))
                t_idx.append(st["t_idx"])
            g.set_samples(q_idx, t_idx)
        self.rec.run_sum = np.asarray(sd["run_sum"], dtype=float)
        self.rec.run_n = np.asarray(sd["run_n"], dtype=np.int64)
        self._event_gen.set_state(sd["event_gen"].cpu())  # a checkpoint loaded with map_location="cuda" moves it
        self._set_lane()  # (the tracked weights' buffers were remade)
        for g in self.groups:  # uniforms drawn ahead from the old state are dropped
            if getattr(g, "onepass", None) is not None:
                g.onepass.unif = None
        self._set_track_layout()
        self._last_flush_step = self.step

    def __repr__(self) -> str:
        return f"Probe({self.logdir!r}, step={self.step}, layers={len(self.layers)}, rank={self.rank})"


def _previous_run_id(path: Path) -> str | None:
    """The ``run_id`` of the run a resumed probe appends to (None for runs written before run ids existed)."""
    try:
        rid = json.loads((path / "meta.json").read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return rid if isinstance(rid, str) else None


def _previous_interventions(logdir: str) -> list[dict[str, Any]]:
    """The ``interventions`` of a run being resumed (its meta.json), so that a resumed run keeps them."""
    try:
        with open(os.path.join(logdir, "meta.json")) as f:
            old = json.load(f).get("interventions")
    except (OSError, ValueError, AttributeError):
        return []
    return [dict(e) for e in old if isinstance(e, dict)] if isinstance(old, list) else []


def _flush_at_exit(ref: weakref.ref) -> None:
    probe = ref()
    if probe is not None and not probe._closed:
        try:
            probe.flush()
        except Exception:  # noqa: BLE001 - never fail interpreter shutdown
            pass


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, logdir: str | os.PathLike, **options: Any) -> Probe:
    """Attach a :class:`Probe` to ``optimizer`` (its step hooks) measuring the binary weights of ``model``.

    Options (defaults): ``binary=None`` (names, predicate ``(name, param) -> bool`` or ``(name, param, module) ->
    bool``, or None = auto-detect: bnn-probe's binary layers, the layers of bitorch/bnn/brevitas through
    :mod:`bnn_probe.integrations`, every parameter of a Bop-family optimizer), ``binarizer=None`` (b(w), the binary
    weight the forward pass uses: a :class:`~bnn_probe.probe.binarizers.Binarizer`, a callable ``w -> b(w)``, or a
    mapping parameter name → one of them; default: the adapter's, else sign with sign(0) = +1),
    ``family=None`` (``"bop"``/``"bop2nd"`` declares a third-party Bop-like optimizer, with ``momentum_key="exp_avg"``
    (its state key of m), ``threshold_key="threshold"`` and ``gamma_key="gamma"`` (its param-group keys of τ and γ);
    a declared key that is absent raises :class:`~bnn_probe.errors.BnnProbeError`), ``check_every=100`` (cadence of
    the run checks of probe/checks.py: warnings in meta.json),
    ``every=1`` (steps table), ``hist_every=100``, ``snapshot_every=1000``, ``track=64``, ``track_every=1``,
    ``events_per_layer=16``, ``events_every=every``, ``quantile_sample=4096``, ``quantile_every=10`` (the steps
    of the steps table whose quantile columns ``*_q..`` are computed — one sort of the sample rows; NaN on the other
    logged steps; 1 = every logged step), ``flush_every_steps=1000``,
    ``flush_secs=10.0``, ``tensorboard=True``, ``tb_every=None`` (= every logged step), ``config=None``, ``tag=None``,
    ``rank=None`` (from torch.distributed), ``resume=False``, ``seed=0``, ``sign_hash=True``, ``buffer_steps=256``,
    ``compile_probe=None`` (``torch.compile`` the every-step measurement: None = on for CUDA, off otherwise; a compile
    failure warns once and measures eagerly), ``device_path=None`` (the pure-torch measurement of probe/fused.py:
    None = on any device but the CPU, where the compiled one-pass measurement of probe/onepass.py is used when
    installed; True forces the pure-torch path on the CPU; implied by compile_probe), ``cuda_graphs=None`` (the
    device path's every-step measurement replayed as one CUDA graph per cadence combination, captured at its second
    step: None = on for CUDA; False = ordinary launches; probe/cuda_graph.py).
    The logged values do not depend on these three options.
    Cadences take an int n (every n-th step; 0 = never) or a schedule (``Every``, ``LogSpaced``).

    >>> probe = attach(model, opt, "runs/x")   # doctest: +SKIP
    """
    return Probe(model, optimizer, logdir, **options)
