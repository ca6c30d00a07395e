"""Turn report arguments (run directories, folders of runs, or Run objects) into loaded runs, with one-line errors."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from ..errors import BnnProbeError

ALL_TABLES = ("layers", "steps", "train", "tracked", "events", "hists", "snapshots", "weight_flips")
REPORT_TABLES = ("layers", "steps", "train", "tracked", "snapshots", "weight_flips")  # what the report reads


def _is_pathlike(x) -> bool:
    return isinstance(x, str | os.PathLike)


def resolve(paths) -> list[Path]:
    """Run directories named by ``paths`` (a run directory, or a folder holding runs)."""
    from ..runlog import find_runs

    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise BnnProbeError(f"no such file or directory: {p}")
        if p.is_dir() and not any(p.iterdir()):
            raise BnnProbeError(f"empty folder: {p} (give a run directory or a folder of runs)")
        found = find_runs(p)
        if not found:
            raise BnnProbeError(f"no bnn-probe runs in {p} (no meta.json found below it)")
        out += [f for f in found if f not in out]
    return out


def load_runs(items, tables=REPORT_TABLES, strict: bool = True) -> list:
    """Load runs and read ``tables`` now. With ``strict``, a broken Parquet part is a one-line error (a run killed
    mid-training has no broken parts: parts are written atomically); without, it is skipped with the reader's
    warning."""
    from ..runlog import load_run

    items = list(items)
    if not items:
        raise BnnProbeError("no runs given")
    runs = []
    paths = resolve([x for x in items if _is_pathlike(x)]) if any(_is_pathlike(x) for x in items) else []
    objs = [x for x in items if not _is_pathlike(x)]
    for p in paths:
        run = load_run(p)
        touch(run, tables, strict)
        runs.append(run)
    return runs + objs


def touch(run, tables=ALL_TABLES, strict: bool = True) -> None:
    """Read the lazily loaded ``tables`` of ``run``, turning unreadable-part warnings into an error if ``strict``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in tables:
            getattr(run, t, None)
    for w in caught:
        msg = str(w.message).splitlines()[0]
        if strict and "unreadable" in msg:
            raise BnnProbeError(f"{msg} (corrupted log; rerun with --skip-broken to analyse the readable parts)")
        sys.stderr.write(f"Warning: {msg}\n")
