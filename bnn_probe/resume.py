"""Checkpoints of a training run and resuming a run killed at any moment (SIGKILL included).

A checkpoint is one file, ``<run>/checkpoint.pt``, written by global rank 0 to a temporary name, fsynced and
renamed over the previous one, so a kill at any moment leaves either the old or the new checkpoint, never a torn
one. It holds everything the next step depends on:

* the run's options (``config``), epoch and optimizer-step counters, per-epoch history;
* the model's ``state_dict`` (binary weights, batch-norm parameters and running statistics), the optimizer's (Bop's
  m, Adam's moments and step counts), the probe's (:meth:`bnn_probe.probe.Probe.state_dict`: step counter,
  per-weight flip counters and last-flip steps, sample indices, running means, the event sampler's RNG);
* the online threshold controllers' state (``--threshold-policy normalized``: the per-layer EMA of |m| and its bias
  correction; ``calibrated``: its step sizes), :func:`bnn_probe.optim.thresholds.controllers_of`;
* the RNG states: the batch-order generator (the data order of the remaining epochs), torch's global CPU generator
  and, on CUDA, the device generators.

Before a checkpoint is written the probe is flushed, so the log on disk always reaches at least the checkpoint's
step. A resumed run restarts from the checkpoint and logs the steps after it again; those rows *replace* the ones the
killed run wrote after the checkpoint: :func:`bnn_probe.load_run` keeps the last row written for each
(step, layer) (parts are read in the order they were written). TensorBoard's files may show the replayed steps
twice. The final binary weights and the (deduplicated) log equal those of an uninterrupted run (tests/test_resume.py).

Example:
    >>> from pathlib import Path
    >>> checkpoint_path("runs/x") == Path("runs/x/checkpoint.pt")
    True
"""

from __future__ import annotations

import os
import random
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from .errors import BnnProbeError
from .optim.thresholds import controllers_of
from .rundir import tmp_path

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_VERSION", "checkpoint_path", "save_checkpoint", "load_checkpoint",
           "restore", "resume_config", "resume_state", "check_belongs"]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoint: ``<run_dir>/checkpoint.pt``."""
    return Path(run_dir) / CHECKPOINT_NAME


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    from .parallel import unwrap

    return unwrap(model)


def _rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        states = s["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)


def save_checkpoint(state: Any, path: str | os.PathLike | None = None) -> Path | None:
    """Flush the probe and write ``state``'s checkpoint atomically (global rank 0 only; other ranks return None).

    ``state`` is a :class:`bnn_probe.train.TrainState` (or any object with ``config``, ``out_dir``, ``model``,
    ``optimizer``, ``probe``, ``generator``, ``epoch``, ``step``, ``history``).
    """
    from .probe.distributed import is_rank_zero

    probe = state.probe
    probe_sd = probe.state_dict() if probe is not None else None  # (collective-free; drains on rank 0)
    if not is_rank_zero():
        return None
    if probe is not None:
        probe.flush()  # the log reaches at least this checkpoint's step before the checkpoint exists
    target = Path(path) if path is not None else checkpoint_path(state.out_dir)
    config = state.config.to_dict() if hasattr(state.config, "to_dict") else dict(state.config)
    ckpt = {
        "version": CHECKPOINT_VERSION, "config": config, "run_id": getattr(probe, "run_id", None),
        "threads": torch.get_num_threads(), "epoch": int(state.epoch), "step": int(state.step),
        "history": list(getattr(state, "history", [])), "model": _unwrap(state.model).state_dict(),
        "optimizer": state.optimizer.state_dict(), "probe": probe_sd, "generator": state.generator.get_state(),
        "rng": _rng_state(), "threshold_controllers": [c.state_dict() for c in controllers_of(state.optimizer)],
    }
    tmp = tmp_path(target)
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # disk full or killed by an exception: no stale temporary file
        raise
    return target


def load_checkpoint(run_dir: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The checkpoint of ``run_dir`` (None when it has none yet); :class:`BnnProbeError` when it is unreadable.

    Read with ``torch.load(..., weights_only=True)``: a checkpoint is untrusted input (run folders are shared), and
    this loader builds only tensors, numbers, strings and containers, never arbitrary objects, so a crafted file
    cannot run code (docs/trust.md). Its structure is checked before anything uses it."""
    p = checkpoint_path(run_dir)
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise BnnProbeError(f"{p} is not a regular file (bnn-probe never follows links in a run folder)")
    if not p.is_file():
        return None
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable or unsafe file is one user-facing error
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise BnnProbeError(f"{p} is not a readable checkpoint of bnn-probe ({type(e).__name__}: {why})") from None
    _check_structure(ckpt, p)
    return ckpt


_CHECKPOINT_FIELDS: dict[str, type | tuple[type, ...]] = {
    "config": dict, "epoch": int, "step": int, "model": dict, "optimizer": dict, "generator": torch.Tensor,
    "rng": dict, "history": list,
}


def _check_structure(ckpt: Any, p: Path) -> None:
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("version", 0), int) or isinstance(
            ckpt.get("version", 0), bool) or ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise BnnProbeError(f"{p} is not a bnn-probe checkpoint of version <= {CHECKPOINT_VERSION}")
    for key, kind in _CHECKPOINT_FIELDS.items():
        v = ckpt.get(key)
        if not isinstance(v, kind) or isinstance(v, bool):
            got = "missing" if key not in ckpt else f"a {type(v).__name__}"
            raise BnnProbeError(f"{p} is not a bnn-probe checkpoint: its {key!r} is {got}")
    if not ckpt["config"]:
        raise BnnProbeError(f"{p} is not a bnn-probe checkpoint: its config is empty")


def _read_run_meta(run_dir: Path) -> dict[str, Any]:
    from .runlog.reader import read_meta

    if not (run_dir / "meta.json").is_file() and not checkpoint_path(run_dir).is_file():
        raise BnnProbeError(f"--resume {run_dir}: no run there (no meta.json, no {CHECKPOINT_NAME})")
    try:
        return read_meta(run_dir)
    except BnnProbeError as e:
        raise BnnProbeError(f"--resume {run_dir}: {e}") from None


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config without ``extra`` (setup adds the threshold policy's description there) and with JSON types."""
    import json

    return json.loads(json.dumps({k: v for k, v in cfg.items() if k != "extra"}, default=str))


def check_belongs(ckpt: dict[str, Any], meta: dict[str, Any], run_dir: str | os.PathLike) -> None:
    """:class:`BnnProbeError` unless the checkpoint was written by the run of ``meta``: the same run id (where both
    record one) and the same options, hence the same architecture (``extra`` aside)."""
    p = checkpoint_path(run_dir)
    a, b = ckpt.get("run_id"), meta.get("run_id")
    if (a is not None or b is not None) and a != b:
        raise BnnProbeError(f"{p} belongs to another run (its run id {a!s:.12} is not this run's {b!s:.12}): "
                            "copy the run folder whole, or start a new run")
    mine, theirs = _comparable(meta.get("config") or {}), _comparable(ckpt["config"])
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        shown = "; ".join(f"{k}: {theirs.get(k)!r:.40} vs {mine.get(k)!r:.40}" for k in diff[:3])
        raise BnnProbeError(f"{p} belongs to another run: its options differ from this run's meta.json ({shown})")


def resume_state(run_dir: str | os.PathLike, known_options: Collection[str] | None = None
                 ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The options a run was started with and its checkpoint (None when it was killed before the first one).

    ``meta.json`` must describe a run of ``bnn-probe train`` (only ``known_options`` in its config, when given) and
    the checkpoint must belong to it (:func:`check_belongs`). :class:`BnnProbeError` (one line) otherwise."""
    run_dir = Path(run_dir)
    meta = _read_run_meta(run_dir)
    cfg = meta.get("config")
    if not isinstance(cfg, dict) or not cfg:
        raise BnnProbeError(f"--resume {run_dir}: its meta.json records no training options to resume with")
    if known_options is not None:
        unknown = sorted(set(cfg) - set(known_options))
        if unknown:
            raise BnnProbeError(f"--resume {run_dir}: not a run of `bnn-probe train` (its config has "
                                f"{', '.join(map(str, unknown[:5]))}); only runs of bnn-probe train or a study can "
                                "resume")
    ckpt = load_checkpoint(run_dir)
    if ckpt is None:
        return dict(cfg), None
    check_belongs(ckpt, meta, run_dir)
    return dict(ckpt["config"]), ckpt


def resume_config(run_dir: str | os.PathLike, known_options: Collection[str] | None = None) -> dict[str, Any]:
    """The options a run was started with: from its checkpoint, or from ``meta.json`` when it was killed before the
    first checkpoint (:func:`resume_state`). :class:`BnnProbeError` when ``run_dir`` holds no run."""
    return resume_state(run_dir, known_options)[0]


def restore(state: Any, ckpt: dict[str, Any]) -> None:
    """Load a checkpoint into a freshly set-up ``state`` (same options): model, optimizer, probe, counters, RNGs."""
    device = next(_unwrap(state.model).parameters()).device
    try:
        _unwrap(state.model).load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(_to_device(ckpt["optimizer"], device))
        if state.probe is not None and ckpt.get("probe") is not None:
            state.probe.load_state_dict(ckpt["probe"])
        # online threshold controllers (calibrated, normalized): their EMA / step-size state, by attachment order
        for ctl, sd in zip(controllers_of(state.optimizer), ckpt.get("threshold_controllers") or [], strict=False):
            ctl.load_state_dict(sd)
        state.generator.set_state(ckpt["generator"])
        _set_rng_state(ckpt["rng"])
    except BnnProbeError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BnnProbeError(f"{checkpoint_path(state.out_dir)} does not fit this run's model and optimizer "
                            f"({type(e).__name__}: {why})") from None
    state.epoch = int(ckpt["epoch"])
    state.step = int(ckpt["step"])
    if hasattr(state, "history"):
        state.history = list(ckpt.get("history", []))


def _to_device(obj: Any, device: torch.device) -> Any:
    """Optimizer state tensors onto the parameters' device (``Optimizer.load_state_dict`` casts floats itself, but
    a CaseOptimizer's nested dicts pass through as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device) if obj.dim() > 0 else obj
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
