"""Turn report arguments (run directories, folders of runs, or Run objects) into loaded runs, with one-line errors."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from ..errors import BnnProbeError

ALL_TABLES = ("layers", "steps", "train", "tracked", "events", "hists", "snapshots", "weight_flips")
REPORT_TABLES = ("layers", "steps", "train", "tracked", "events", "snapshots", "weight_flips")  # what the report reads


def _is_pathlike(x) -> bool:
    return isinstance(x, str | os.PathLike)


def _runs_without_meta(p: Path, found: list[Path]) -> list[Path]:
    """Folders at or below ``p`` that hold a run's tables (``layers.parquet`` or ``steps/``) but no ``meta.json``
    and lie outside every run in ``found``: without this check a run whose meta.json was lost would silently drop
    out of a report of its folder."""
    if not p.is_dir():
        return []
    marks = [f.parent for f in p.rglob("layers.parquet") if f.is_file()]
    marks += [d.parent for d in p.rglob("steps") if d.is_dir() and any(d.glob("part-*.parquet"))]
    out = []
    for d in sorted(set(marks)):
        if (d / "meta.json").is_file() or any(d == r or r in d.parents for r in found):
            continue
        out.append(d)
    return out


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
        orphans = _runs_without_meta(p, found)
        if orphans:
            o = orphans[0]
            what = "restore its meta.json" if o == p else f"restore its meta.json, or move {o} out of {p}"
            more = f" ({len(orphans)} such folders)" if len(orphans) > 1 else ""
            raise BnnProbeError(f"{o} holds run-log tables but no meta.json (deleted or not yet written): {what}{more}")
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
            msg = msg.removeprefix("skipping ")  # strict: the part is not skipped, the command stops
            raise BnnProbeError(f"{msg} (corrupted log; rerun with --skip-broken to analyse the readable parts)")
        sys.stderr.write(f"Warning: {msg}\n")
