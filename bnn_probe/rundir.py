"""What bnn-probe owns in a run folder, and how it replaces or guards one (docs/trust.md).

A run folder may hold files its user put there, and may have been written by someone else. Three rules follow:

* **Ownership.** A folder is a run of bnn-probe when its ``meta.json`` is a regular file whose JSON says
  ``"format": "bnn-probe-run"``. The files bnn-probe owns in it are exactly those :func:`owned_files` lists: the
  top-level files it writes (``meta.json``, ``layers.parquet``, ``weight_flips.parquet``, ``checkpoint.pt``, the lock
  file, their temporary names), the ``part-NNNNNN.parquet`` parts of its tables' folders and TensorBoard's event files
  under ``tb/``. ``--overwrite`` deletes these and nothing else, and refuses a folder that is not a run.
* **No links.** ``--overwrite`` follows none: a symbolic link where it would delete or the new run would write (the
  run folder itself, a table folder, an owned file) is refused before anything is deleted, so no file outside the
  folder is touched.
* **One writer.** :class:`RunLock` holds an exclusive ``flock`` on ``<run>/.bnn-probe.lock`` while a process writes
  the run (the training runner and every :class:`~bnn_probe.runlog.RunWriter`); a second ``train --resume`` (or
  ``--overwrite``, or probe) of the same folder gets a one-line error. Temporary files carry the writer's process id
  (:func:`tmp_path`), so two processes never write to the same temporary name.

Example:
    >>> tmp_path(Path("runs/x/meta.json")).name.startswith(".meta.json.")
    True
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BnnProbeError

__all__ = ["LOCK_NAME", "RUN_FILES", "RUN_TABLE_DIRS", "RunLock", "OwnedFiles", "owned_files", "remove_owned",
           "tmp_path", "is_run_folder"]

LOCK_NAME = ".bnn-probe.lock"
# Every file a run writes at its top level, and its table folders: a new file a run writes must be added here, or
# --overwrite keeps (and reports) it as a file bnn-probe did not write.
RUN_FILES = ("meta.json", "layers.parquet", "weight_flips.parquet", "checkpoint.pt", LOCK_NAME)
RUN_TABLE_DIRS = ("steps", "tracked", "events", "hists", "snapshots", "train", "scales")  # = schema.PART_TABLES
_TMP = re.compile(r"^\.(?P<name>.+?)(\.\d+)?\.tmp$")
_PART = re.compile(r"^part-\d+\.parquet$")
_TB = re.compile(r"^events\.out\.tfevents\.")


def tmp_path(path: Path) -> Path:
    """The temporary name a write-then-rename of ``path`` uses in this process: ``.<name>.<pid>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _is_tmp_of(name: str, pattern: re.Pattern[str] | tuple[str, ...]) -> bool:
    m = _TMP.match(name)
    if not m:
        return False
    base = m.group("name")
    return bool(pattern.match(base)) if isinstance(pattern, re.Pattern) else base in pattern


def _lstat(p: Path) -> os.stat_result | None:
    try:
        return os.lstat(p)
    except FileNotFoundError:
        return None


def is_run_folder(path: Path) -> bool:
    """``path`` is a real folder (not a link) whose ``meta.json`` is a regular file of format ``bnn-probe-run``."""
    from .runlog.schema import FORMAT

    st, mst = _lstat(path), _lstat(path / "meta.json")
    if st is None or not stat.S_ISDIR(st.st_mode) or mst is None or not stat.S_ISREG(mst.st_mode):
        return False
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


@dataclass
class OwnedFiles:
    """The result of :func:`owned_files`: files and (afterwards emptied) folders bnn-probe wrote, and the entries it
    did not write (kept)."""

    files: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)


def _link_error(p: Path) -> BnnProbeError:
    return BnnProbeError(f"{p} is a symbolic link: bnn-probe never follows links in a run folder; replace it by the "
                         "real file or folder, or choose another --out")


def owned_files(run_dir: str | os.PathLike) -> OwnedFiles:
    """The files bnn-probe owns in the run folder ``run_dir`` (see the module docstring). :class:`BnnProbeError`
    when ``run_dir`` is a link, not a run, or holds a link (or a file of the wrong kind) under an owned name."""
    run = Path(run_dir)
    st = _lstat(run)
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise _link_error(run)
    if st is None or not stat.S_ISDIR(st.st_mode):
        raise BnnProbeError(f"{run} is not a folder")
    if not is_run_folder(run):
        raise BnnProbeError(f"{run} does not hold a bnn-probe run (its meta.json is missing or not of format "
                            "bnn-probe-run): bnn-probe replaces only its own runs; choose another --out")
    out = OwnedFiles()
    for entry in sorted(os.scandir(run), key=lambda e: e.name):
        p = Path(entry.path)
        name = entry.name
        if entry.is_symlink():
            if name in RUN_FILES or name in RUN_TABLE_DIRS or name == "tb" or _is_tmp_of(name, RUN_FILES):
                raise _link_error(p)
            out.foreign.append(p)
        elif name in RUN_FILES or _is_tmp_of(name, RUN_FILES):
            if not entry.is_file(follow_symlinks=False):
                raise BnnProbeError(f"{p} is not a regular file: not a folder bnn-probe wrote; move it away")
            if name != LOCK_NAME:
                out.files.append(p)
        elif name in RUN_TABLE_DIRS or name == "tb":
            if not entry.is_dir(follow_symlinks=False):
                raise BnnProbeError(f"{p} is not a folder: not a file bnn-probe wrote; move it away")
            _owned_in(p, _TB if name == "tb" else _PART, out, recursive=name == "tb")
        else:
            out.foreign.append(p)
    return out


def _owned_in(folder: Path, pattern: re.Pattern[str], out: OwnedFiles, recursive: bool) -> None:
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        p = Path(entry.path)
        if entry.is_symlink():
            raise _link_error(p)
        if entry.is_dir(follow_symlinks=False) and recursive:
            _owned_in(p, pattern, out, recursive)
        elif entry.is_file(follow_symlinks=False) and (pattern.match(entry.name) or _is_tmp_of(entry.name, pattern)):
            out.files.append(p)
        else:
            out.foreign.append(p)
    out.dirs.append(folder)


def remove_owned(plan: OwnedFiles) -> None:
    """Delete the files of ``plan`` (unlink, never following links), then its folders that became empty."""
    for f in plan.files:
        os.unlink(f)
    for d in plan.dirs:  # deepest first: _owned_in appends a folder after its subfolders
        try:
            os.rmdir(d)
        except OSError:  # holds files bnn-probe did not write: kept
            pass


_HELD: dict[str, list[int]] = {}  # real path of a locked run folder -> [descriptor, holders in this process]


class RunLock:
    """An exclusive lock on a run folder (``flock`` on ``<run>/.bnn-probe.lock``) held while a process writes it.

    ``RunLock(run_dir)`` takes the lock or raises :class:`BnnProbeError` (one line) when another process holds it.
    Within one process it is re-entrant (the training runner and the probe's :class:`~bnn_probe.runlog.RunWriter`
    both hold it); the flock is given back when the last holder calls :meth:`release` (or leaves its ``with`` block,
    or is garbage-collected) and in any case when the process ends. The lock file stays (it is owned by bnn-probe).
    Where ``fcntl`` does not exist (Windows) the lock is a no-op.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.key: str | None = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        key = os.path.realpath(run_dir)
        if key in _HELD:
            _HELD[key][1] += 1
            self.key = key
            return
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise BnnProbeError(f"cannot open the lock file {self.path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise BnnProbeError(f"{self.path.parent} is being written by another bnn-probe process (pid {holder}); "
                                "wait until it ends, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = [fd, 1]
        self.key = key

    def release(self) -> None:
        """Give this holder's share of the lock back (idempotent)."""
        key, self.key = self.key, None
        entry = _HELD.get(key) if key is not None else None
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            os.close(entry[0])  # closing the descriptor releases the flock

    def __del__(self) -> None:  # a TrainState dropped without running its loop gives the lock back
        self.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
