"""Checkpoints of a training run and resuming a run killed at any moment (SIGKILL included).

A checkpoint is one file, ``<run>/checkpoint.pt``, written by global rank 0 to a temporary name, fsynced and
renamed over the previous one, so a kill at any moment leaves either the old or the new checkpoint, never a torn
one. It holds everything the next step depends on:

* the run's options (``config``), epoch and optimizer-step counters, per-epoch history;
* the model's ``state_dict`` (binary weights, batch-norm parameters and running statistics), the optimizer's (Bop's
  m, Adam's moments and step counts), the probe's (:meth:`bnn_probe.probe.Probe.state_dict`: step counter,
  per-weight flip counters and last-flip steps, sample indices, running means, the event sampler's RNG);
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
from pathlib import Path
from typing import Any

import torch

from .errors import BnnProbeError

__all__ = ["CHECKPOINT_NAME", "CHECKPOINT_VERSION", "checkpoint_path", "save_checkpoint", "load_checkpoint",
           "restore", "resume_config"]

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
        "version": CHECKPOINT_VERSION, "config": config, "epoch": int(state.epoch), "step": int(state.step),
        "history": list(getattr(state, "history", [])), "model": _unwrap(state.model).state_dict(),
        "optimizer": state.optimizer.state_dict(), "probe": probe_sd, "generator": state.generator.get_state(),
        "rng": _rng_state(),
    }
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    return target


def load_checkpoint(run_dir: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any] | None:
    """The checkpoint of ``run_dir`` (None when it has none yet); :class:`BnnProbeError` when it is unreadable."""
    p = checkpoint_path(run_dir)
    if not p.is_file():
        return None
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise BnnProbeError(f"{p} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise BnnProbeError(f"{p} is not a bnn-probe checkpoint of version <= {CHECKPOINT_VERSION}")
    return ckpt


def resume_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The options a run was started with: from its checkpoint, or from ``meta.json`` when it was killed before the
    first checkpoint. :class:`BnnProbeError` when ``run_dir`` holds no run."""
    ckpt = load_checkpoint(run_dir)
    if ckpt is not None:
        return dict(ckpt["config"])
    meta = Path(run_dir) / "meta.json"
    if not meta.is_file():
        raise BnnProbeError(f"--resume {run_dir}: no run there (no meta.json, no {CHECKPOINT_NAME})")
    import json

    try:
        cfg = json.loads(meta.read_text()).get("config")
    except ValueError:
        cfg = None
    if not isinstance(cfg, dict) or not cfg:
        raise BnnProbeError(f"--resume {run_dir}: its meta.json records no training options to resume with")
    from dataclasses import fields

    from .train import TrainConfig

    unknown = sorted(set(cfg) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise BnnProbeError(f"--resume {run_dir}: not a run of `bnn-probe train` (its config has "
                            f"{', '.join(map(str, unknown[:5]))}); only runs of bnn-probe train or a study can resume")
    return cfg


def restore(state: Any, ckpt: dict[str, Any]) -> None:
    """Load a checkpoint into a freshly set-up ``state`` (same options): model, optimizer, probe, counters, RNGs."""
    device = next(_unwrap(state.model).parameters()).device
    _unwrap(state.model).load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(_to_device(ckpt["optimizer"], device))
    if state.probe is not None and ckpt.get("probe") is not None:
        state.probe.load_state_dict(ckpt["probe"])
    state.generator.set_state(ckpt["generator"])
    _set_rng_state(ckpt["rng"])
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
