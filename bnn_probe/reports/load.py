"""Turn report arguments (run directories, folders of runs, or Run objects) into loaded runs, with one-line errors."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from ..errors import BnnProbeError
from ..safe_text import terminal_safe

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
    out = runs + objs
    unique_names(out)
    return out


def unique_keys(paths: list[Path]) -> list[str]:
    """A name per run folder that no other folder of ``paths`` has: the folder's name, or, where two share it, the
    shortest tail of their paths that tells them apart (``s1/x`` and ``s2/x``); ``#2``, ``#3`` if even the full
    paths agree."""
    parts = [Path(p).resolve().parts[1:] or ("/",) for p in paths]
    keys = ["/".join(pp[-1:]) for pp in parts]
    for depth in range(2, max((len(pp) for pp in parts), default=1) + 1):
        dup = {k for k in keys if keys.count(k) > 1}
        if not dup:
            break
        keys = ["/".join(pp[-depth:]) if k in dup else k for k, pp in zip(keys, parts, strict=True)]
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        seen[k] = seen.get(k, 0) + 1
        if seen[k] > 1:
            keys[i] = f"{k}#{seen[k]}"
    return keys


def unique_names(runs: list) -> None:
    """Make ``run.name`` unique among ``runs`` (analyses key tables, figures and verdicts on it): runs read from
    folders get :func:`unique_keys` of their paths where names collide; other run objects (no folder) a ``#n``
    suffix."""
    names = [str(getattr(r, "name", "") or "run") for r in runs]
    if len(set(names)) == len(names):
        return
    with_path = [i for i, r in enumerate(runs) if getattr(r, "path", None) and Path(r.path).is_dir()]
    clash = [names.count(n) > 1 for n in names]
    for i, k in zip(with_path, unique_keys([runs[i].path for i in with_path]), strict=True):
        names[i] = k if clash[i] else names[i]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        seen[n] = seen.get(n, 0) + 1
        names[i] = n if seen[n] == 1 else f"{n}#{seen[n]}"
    for r, n in zip(runs, names, strict=True):
        if str(getattr(r, "name", "")) != n:
            try:
                r.name = n
            except AttributeError as e:  # a read-only name: the report could not tell these runs apart
                raise BnnProbeError(f"two runs are both called {n.split('#')[0]!r} and cannot be renamed: give "
                                    "run folders with different names") from e


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
        sys.stderr.write(f"Warning: {terminal_safe(msg, one_line=True)}\n")
