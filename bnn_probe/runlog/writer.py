"""Writes a run directory: ``meta.json`` (atomic), Parquet tables and parts (write-then-rename), TensorBoard events.

Example:
    >>> import tempfile, pandas as pd
    >>> w = RunWriter(tempfile.mkdtemp() + "/run", tensorboard=False)
    >>> w.append("train", pd.DataFrame({"step": [1], "epoch": [None], "name": ["loss"], "value": [0.5]})).name
    'part-000000.parquet'
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import BnnProbeError
from .schema import PART_TABLES, conform

__all__ = ["RunWriter", "now_iso", "atomic_write_json"]

_PART = re.compile(r"part-(\d+)\.parquet$")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def atomic_write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    return repr(o)


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


class RunWriter:
    """The files of one run directory. ``resume=True`` appends to an existing run (new part numbers)."""

    def __init__(self, logdir: str | os.PathLike, tensorboard: bool = True, resume: bool = False) -> None:
        self.path = Path(logdir)
        if (self.path / "meta.json").exists() and not resume:
            raise BnnProbeError(f"{self.path} already holds a run: pass resume=True to append, or use another logdir")
        self.path.mkdir(parents=True, exist_ok=True)
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
