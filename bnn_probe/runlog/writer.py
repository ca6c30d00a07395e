"""Writes a run directory: ``meta.json`` (atomic), Parquet tables and parts (write-then-rename), TensorBoard events.

Example:
    >>> import tempfile, pandas as pd
    >>> w = RunWriter(tempfile.mkdtemp() + "/run", tensorboard=False)
    >>> w.append("train", pd.DataFrame({"step": [1], "epoch": [None], "name": ["loss"], "value": [0.5]})).name
    'part-000000.parquet'
"""

from __future__ import annotations

import json
import math
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import BnnProbeError
from ..rundir import RunLock, tmp_path
from .schema import PART_TABLES, conform

__all__ = ["RunWriter", "now_iso", "atomic_write_json", "strict_json", "mark_status_in_place"]

_PART = re.compile(r"part-(\d+)\.parquet$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def atomic_write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as strict JSON (non-finite floats become ``null``: no ``NaN``/``Infinity``, which strict JSON
    readers reject) to a per-process temporary name, fsync, rename over ``path``."""
    text = json.dumps(strict_json(obj), indent=1, allow_nan=False)
    tmp = tmp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def mark_status_in_place(meta_path: Path, status: str) -> bool:
    """Overwrite the ``"status": "running"`` of ``meta_path`` with ``status`` byte for byte in place (padded with
    spaces), allocating no disk space: the way to mark a run failed when the disk is full and no temporary file can
    be written. Returns False when the file holds no such field or cannot be written."""
    try:
        data = meta_path.read_bytes()
        m = re.search(rb'"status": ("running")', data)
        new = json.dumps(status).encode()
        if m is None or len(new) > len(m.group(1)):
            return False
        fd = os.open(meta_path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.pwrite(fd, new.ljust(len(m.group(1))), m.start(1))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def strict_json(o: Any) -> Any:
    """``o`` with every non-finite float replaced by None and other non-JSON objects converted (``to_dict``,
    ``item``, else ``repr``): what :func:`json.dumps` with ``allow_nan=False`` accepts."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, str | bool | int):
        return o
    if isinstance(o, dict):
        return {str(k): strict_json(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [strict_json(v) for v in o]
    if hasattr(o, "to_dict"):
        return strict_json(o.to_dict())
    if hasattr(o, "item"):
        return strict_json(o.item())
    return repr(o)


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = tmp_path(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RunWriter:
    """The files of one run directory. ``resume=True`` appends to an existing run (new part numbers).

    Holds the run folder's lock (:class:`bnn_probe.rundir.RunLock`) from creation to :meth:`close`: a second process
    writing the same run (a second resume, a probe attached twice) gets a one-line error."""

    def __init__(self, logdir: str | os.PathLike, tensorboard: bool = True, resume: bool = False) -> None:
        self.path = Path(logdir)
        if (self.path / "meta.json").exists() and not resume:
            raise BnnProbeError(f"{self.path} already holds a run: pass resume=True to append, or use another logdir")
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock: RunLock | None = RunLock(self.path)  # one writing process per run folder (docs/trust.md)
        self._next: dict[str, int] = {}
        for t in PART_TABLES:
            d = self.path / t
            nums = [int(m.group(1)) for f in d.glob("part-*.parquet") if (m := _PART.search(f.name))] \
                if d.is_dir() else []
            self._next[t] = max(nums) + 1 if nums else 0
        self._tb = None
        self.tensorboard = tensorboard

    @property
    def tb(self):
        """The TensorBoard ``SummaryWriter`` (``tb/``), created on first use; None when disabled."""
        if self._tb is None and self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"), max_queue=1000, flush_secs=3600)
        return self._tb

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.path / "meta.json", meta)

    def write_table(self, table: str, df: pd.DataFrame) -> Path:
        """Write (or rewrite) a single-file table such as ``layers.parquet`` or ``weight_flips.parquet``."""
        path = self.path / f"{table}.parquet"
        _write_parquet(conform(df, table), path)
        return path

    def append(self, table: str, df: pd.DataFrame) -> Path | None:
        """Append rows as a new part ``<table>/part-NNNNNN.parquet``; nothing for an empty frame."""
        if df is None or len(df) == 0:
            return None
        d = self.path / table
        d.mkdir(exist_ok=True)
        path = d / f"part-{self._next[table]:06d}.parquet"
        self._next[table] += 1
        _write_parquet(conform(df, table), path)
        return path

    def flush_tb(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None
