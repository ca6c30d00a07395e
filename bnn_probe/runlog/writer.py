"""Writes a run directory: ``meta.json`` (atomic), Parquet tables and parts (write-then-rename), TensorBoard events
(:class:`bnn_probe.runlog.tbevents.EventWriter`).

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
from .schema import PART_TABLES, conform, empty_frame

__all__ = ["RunWriter", "now_iso", "atomic_write_json", "strict_json", "mark_status_in_place", "string_column",
           "nullable_int"]

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


# Columns worth a Parquet dictionary (few distinct values) in the per-step tables; the other columns (measured floats,
# random indices) are written plainly: dictionary-encoding them costs most of a part's write time and saves no space.
# Tables not listed use a dictionary for every column. The values and the schema do not depend on this choice.
_DICTIONARY: dict[str, list[str]] = {
    "steps": ["step", "layer"], "tracked": ["step", "layer", "index", "sign"], "events": ["step", "layer"],
    "hists": ["step", "layer", "quantity", "bin", "left", "right"], "train": ["step", "epoch", "name"],
}


# In those tables the float64 columns are written byte-stream-split (the Parquet encoding for floating-point data:
# the k-th bytes of all values together, which zstd compresses better, and faster), and column statistics (min/max
# per page, for readers that filter) are kept for the key columns only: on the tracked-weights table of a 580-step
# run this writes in 9 ms instead of 12 ms, into 0.86 MB instead of 0.97 MB (benchmarks/RESULTS.md).
_STATISTICS = ["step", "layer", "epoch", "name", "quantity"]


def _write_parquet(df: pd.DataFrame | pa.Table, path: Path, table_name: str | None = None) -> None:
    tmp = tmp_path(path)
    table = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    options: dict[str, Any] = {"use_dictionary": True}
    if table_name in _DICTIONARY:
        names = table.column_names
        options = {"use_dictionary": [c for c in _DICTIONARY[table_name] if c in names],
                   "use_byte_stream_split": [f.name for f in table.schema if pa.types.is_floating(f.type)
                                             and f.name not in _DICTIONARY[table_name]] or False,
                   "write_statistics": [c for c in _STATISTICS if c in names] or False}
    try:
        pq.write_table(table, tmp, compression="zstd", **options)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_SCHEMAS: dict[str, pa.Schema] = {}


def _schema(table: str) -> pa.Schema:
    """The Arrow schema (with its pandas metadata) that :meth:`RunWriter.append` gives a complete frame of
    ``table``: the documented columns in order, each in its documented dtype."""
    if table not in _SCHEMAS:
        _SCHEMAS[table] = pa.Table.from_pandas(conform(empty_frame(table), table), preserve_index=False).schema
    return _SCHEMAS[table]


def _from_columns(table: str, columns: dict[str, Any]) -> pa.Table:
    """A table from every documented column of ``table``, each already in its dtype (numpy arrays; strings as
    :func:`string_column`, nullable integers as :func:`nullable_int`): the schema, pandas metadata included, of
    the equivalent DataFrame written by :meth:`RunWriter.append`, without building that DataFrame."""
    schema = _schema(table)
    extra = sorted(set(columns) - set(schema.names))
    if extra:
        raise ValueError(f"columns not in the {table} table: {', '.join(extra)}")
    arrays = [c if isinstance(c := columns[f.name], pa.Array) and c.type == f.type else pa.array(c, type=f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def string_column(codes: Any, names: list[str]) -> pa.Array:
    """A string column given as integer codes into ``names`` (one copy of each name, no Python objects per row)."""
    return pa.array(names, type=pa.large_string()).take(pa.array(codes))


def nullable_int(values: Any, null: Any) -> pa.Array:
    """An int64 column with nulls where ``null`` is true (pandas ``Int64``)."""
    return pa.array(values, type=pa.int64(), mask=null)


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
        """The TensorBoard event writer of ``tb/`` (:class:`~bnn_probe.runlog.tbevents.EventWriter`: ``add_scalar``,
        ``add_histogram_raw``, ``add_scalars_bulk``), created on first use; None when disabled. Its records reach the
        file at :meth:`flush_tb` (each flush of the probe)."""
        if self._tb is None and self.tensorboard:
            from .tbevents import EventWriter

            self._tb = EventWriter(self.path / "tb")
        return self._tb

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_json(self.path / "meta.json", meta)

    def write_table(self, table: str, df: pd.DataFrame | dict[str, Any]) -> Path:
        """Write (or rewrite) a single-file table such as ``layers.parquet`` or ``weight_flips.parquet``
        (``df``: a DataFrame, or a dict of every column as in :meth:`append`)."""
        path = self.path / f"{table}.parquet"
        _write_parquet(_from_columns(table, df) if isinstance(df, dict) else conform(df, table), path)
        return path

    def append(self, table: str, df: pd.DataFrame | dict[str, Any] | None) -> Path | None:
        """Append rows as a new part ``<table>/part-NNNNNN.parquet``; nothing for an empty frame.

        ``df``: a DataFrame (conformed to the documented columns), or — the fast path of the probe's recorder — a
        dict of every documented column already in its dtype (:func:`_from_columns`), which gives the same part."""
        if isinstance(df, dict):
            df = _from_columns(table, df)
        if df is None or len(df) == 0:
            return None
        d = self.path / table
        d.mkdir(exist_ok=True)
        path = d / f"part-{self._next[table]:06d}.parquet"
        self._next[table] += 1
        _write_parquet(df if isinstance(df, pa.Table) else conform(df, table), path, table)
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
