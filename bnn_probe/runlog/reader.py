"""Reads a run directory back: :func:`load_run` → :class:`Run` (metadata + pandas DataFrames), :func:`find_runs`.

Example:
    >>> run = load_run("runs/x")          # doctest: +SKIP
    >>> run.steps.groupby("layer").flip_ratio.mean()   # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from ..errors import RunLogError
from .schema import FORMAT, SCHEMA_VERSION, TABLES, conform, empty_frame

__all__ = ["Run", "load_run", "find_runs", "read_meta"]


def read_meta(path: Path) -> dict[str, Any]:
    """Parse and check ``meta.json`` (one-line :class:`RunLogError` when missing, unreadable or newer)."""
    f = path / "meta.json"
    if not path.exists():
        raise RunLogError(f"run directory not found: {path}")
    if not path.is_dir() or not f.exists():
        raise RunLogError(f"not a bnn-probe run directory (no meta.json): {path}")
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise RunLogError(f"unreadable meta.json in {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunLogError(f"not a bnn-probe run directory (meta.json format is not {FORMAT!r}): {path}")
    ver = meta.get("schema_version")
    if not isinstance(ver, int):
        raise RunLogError(f"unreadable meta.json in {path}: schema_version missing or not an integer")
    if ver > SCHEMA_VERSION:
        raise RunLogError(f"{path} was written by a newer bnn-probe (schema {ver} > {SCHEMA_VERSION}): "
                          "upgrade bnn-probe")
    for key, kinds in _META_TYPES.items():
        v = meta.get(key)
        if v is not None and (not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds)):
            want = " or ".join(_KIND_NAMES[k] for k in kinds)
            raise RunLogError(f"unreadable meta.json in {path}: {key!r} must be {want}, not {type(v).__name__}")
    groups = (meta.get("optimizer") or {}).get("groups")
    if groups is not None and not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        raise RunLogError(f"unreadable meta.json in {path}: 'optimizer.groups' must be a list of objects")
    return meta


# Fields of meta.json the readers use, and their JSON types (None is allowed for each): a hand-edited or crafted
# meta.json with another type is a one-line error, not a traceback deep in an analysis.
_META_TYPES: dict[str, tuple[type, ...]] = {
    "status": (str,), "family": (str,), "tag": (str,), "config": (dict,), "last_step": (int,), "layers": (list,),
    "run_id": (str,), "world_size": (int,), "created_at": (str,), "updated_at": (str,), "probe": (dict,),
    "optimizer": (dict,), "model": (dict,), "warnings": (list,),
}
_KIND_NAMES = {str: "a string", dict: "an object", int: "an integer", list: "a list"}


def _read_file(f: Path) -> pd.DataFrame | None:
    try:
        return pq.read_table(f).to_pandas()
    except Exception as e:  # noqa: BLE001 - any broken part is skipped, named in the warning
        why = str(e).splitlines()[0] if str(e) else ""
        warnings.warn(f"skipping unreadable run-log part {f}: {type(e).__name__}: {why}", RuntimeWarning,
                      stacklevel=3)
        return None


def _typed(df: pd.DataFrame | None, table: str, f: Path) -> pd.DataFrame | None:
    """``df`` when its documented numeric columns hold numbers (or nulls); else None, with the same warning
    as an unreadable part (a part whose ``step`` column holds strings is as broken as a torn file)."""
    if df is None:
        return None
    for c, d in TABLES[table].items():
        if c in df.columns and d not in ("string", "object") and not pd.api.types.is_numeric_dtype(df[c]):
            try:
                df[c].astype("float64")
            except (TypeError, ValueError, OverflowError):
                warnings.warn(f"skipping unreadable run-log part {f}: column {c!r} holds {df[c].dtype} values, not "
                              f"{d}", RuntimeWarning, stacklevel=3)
                return None
    return df


def _read_parts(path: Path, table: str) -> pd.DataFrame:
    d = path / table
    files = sorted(d.glob("part-*.parquet")) if d.is_dir() else []
    frames = [df for f in files if (df := _typed(_read_file(f), table, f)) is not None and len(df)]
    if not frames:
        return empty_frame(table)
    return conform(pd.concat(frames, ignore_index=True), table)


def _read_single(path: Path, table: str) -> pd.DataFrame:
    f = path / f"{table}.parquet"
    if not f.exists():
        return empty_frame(table)
    df = _typed(_read_file(f), table, f)
    return empty_frame(table) if df is None else conform(df, table)


class Run:
    """One run directory: ``meta`` (dict) and DataFrames read lazily (empty with the documented columns if absent).

    Per-step tables that a resumed run logged twice keep the last row written for each key.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = read_meta(self.path)
        self._name: str | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r}, last_step={self.meta.get('last_step')})"

    @property
    def name(self) -> str:
        """The run's name: its folder's name, unless a report of several runs gave it a longer unique one
        (``s1/x`` and ``s2/x``, :func:`bnn_probe.reports.load.unique_names`)."""
        return self._name or self.path.name

    @name.setter
    def name(self, value: str) -> None:
        self._name = str(value)

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @cached_property
    def layers(self) -> pd.DataFrame:
        return _read_single(self.path, "layers")

    @cached_property
    def steps(self) -> pd.DataFrame:
        df = _read_parts(self.path, "steps")
        return _dedupe(df, ["step", "layer"])

    @cached_property
    def tracked(self) -> pd.DataFrame:
        return _dedupe(_read_parts(self.path, "tracked"), ["step", "layer", "index"])

    @cached_property
    def events(self) -> pd.DataFrame:
        return _dedupe(_read_parts(self.path, "events"), ["step", "layer", "index"])

    @cached_property
    def hists(self) -> pd.DataFrame:
        return _dedupe(_read_parts(self.path, "hists"), ["step", "layer", "quantity", "bin"])

    @cached_property
    def snapshots(self) -> pd.DataFrame:
        return _dedupe(_read_parts(self.path, "snapshots"), ["step", "layer"])

    @cached_property
    def weight_flips(self) -> pd.DataFrame:
        return _read_single(self.path, "weight_flips")

    @cached_property
    def scales(self) -> pd.DataFrame:
        """Scaling factors of binarizers that have one (docs/runlog-format.md); empty for the others."""
        return _dedupe(_read_parts(self.path, "scales"), ["step", "layer"])

    @property
    def warnings(self) -> list[dict[str, Any]]:
        """The probe's run checks (meta.json ``"warnings"``): ``[{"kind", "layer", "step", "message"}]``."""
        ws = self.meta.get("warnings")
        return [w for w in ws if isinstance(w, dict)] if isinstance(ws, list) else []

    @cached_property
    def train_long(self) -> pd.DataFrame:
        """``probe.log(...)`` rows as written: step, epoch, name, value."""
        return _read_parts(self.path, "train")

    @cached_property
    def train(self) -> pd.DataFrame:
        """Training metrics, wide: one row per (step, epoch), one column per logged name (last value wins)."""
        long = self.train_long
        if long.empty:
            return pd.DataFrame({"step": pd.Series(dtype="Int64"), "epoch": pd.Series(dtype="Int64")})
        wide = (long.groupby(["step", "epoch", "name"], dropna=False, sort=False)["value"].last()
                .unstack("name").reset_index())
        wide.columns.name = None
        wide = wide.sort_values(["step", "epoch"], na_position="first", kind="stable").reset_index(drop=True)
        wide["step"] = wide["step"].astype("Int64")
        wide["epoch"] = wide["epoch"].astype("Int64")
        return wide


def _dedupe(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if df.empty:
        return df
    if df.duplicated(keys, keep="last").any():
        df = df.drop_duplicates(keys, keep="last")
    return df.sort_values(keys[:2], kind="stable").reset_index(drop=True)


def load_run(path: str | os.PathLike) -> Run:
    """Open a run directory; raises :class:`~bnn_probe.errors.RunLogError` (one line) if it is missing, not a run,
    unreadable or of a newer schema version."""
    return Run(path)


def find_runs(path: str | os.PathLike) -> list[Path]:
    """``[path]`` if ``path`` is a run directory, else every run directory below it (sorted); RunLogError if
    ``path`` does not exist."""
    p = Path(path)
    if not p.exists():
        raise RunLogError(f"path not found: {p}")
    if (p / "meta.json").is_file():
        return [p]
    return sorted(f.parent for f in p.rglob("meta.json") if f.is_file())
