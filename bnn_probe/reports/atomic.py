"""A report folder is written whole or not at all: built in a temporary sibling folder, then moved into place.

:func:`report_folder` yields an empty temporary folder next to ``--out`` (``.<name>.<random>.tmp``); when the block
ends without an error the folder's file list is written to ``.bnn-probe-report`` and the folder takes the place of
``--out`` — on Linux by one atomic exchange (``renameat2(RENAME_EXCHANGE)``), elsewhere by two renames — and the
previous report is deleted. A kill or a full disk at any moment leaves ``--out`` holding either the old report or the
new one, never a mix; an ``OSError`` while writing is a one-line :class:`~bnn_probe.errors.BnnProbeError` and the
temporary folder is removed.

``--out`` may be absent, an empty folder, or a previous report: a folder whose files are all listed in its
``.bnn-probe-report`` (or, for reports written before that list existed, only ``report.html``, ``report.md``,
``verdicts.json``, ``figures/*.png`` and ``tables/*.csv``). Anything else (a folder holding other files, a link) is
refused: replacing it would delete files bnn-probe did not write.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import BnnProbeError

__all__ = ["MANIFEST", "report_folder", "check_replaceable"]

MANIFEST = ".bnn-probe-report"
_LEGACY_FILES = {"report.html", "report.md", "verdicts.json"}
_LEGACY_DIRS = {"figures": ".png", "tables": ".csv"}


def _files(folder: Path) -> list[str]:
    """Relative paths of every entry below ``folder`` (links and folders included, not followed)."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        rel = Path(root).relative_to(folder)
        out += [(rel / f).as_posix() for f in files]
        out += [(rel / d).as_posix() + "/" for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(out)


def _owned(folder: Path, rel: str, listed: set[str] | None) -> bool:
    p = folder / rel
    if rel.endswith("/") or p.is_symlink() or not p.is_file():
        return False
    if listed is not None:
        return rel in listed or rel == MANIFEST
    parts = rel.split("/")
    if len(parts) == 1:
        return rel in _LEGACY_FILES
    return len(parts) == 2 and parts[0] in _LEGACY_DIRS and parts[1].endswith(_LEGACY_DIRS[parts[0]])


def check_replaceable(out: Path) -> None:
    """:class:`BnnProbeError` unless ``out`` is absent, an empty folder or a previous bnn-probe report."""
    if out.is_symlink():
        raise BnnProbeError(f"--out {out} is a symbolic link: give the real folder (bnn-probe does not replace "
                            "what a link points to)")
    if not out.exists():
        return
    if not out.is_dir():
        raise BnnProbeError(f"--out {out} exists and is not a folder")
    listed: set[str] | None = None
    if (out / MANIFEST).is_file():
        try:
            listed = set((out / MANIFEST).read_text(encoding="utf-8").splitlines())
        except (OSError, UnicodeDecodeError):
            listed = set()
    foreign = [rel for rel in _files(out) if not _owned(out, rel, listed)]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise BnnProbeError(f"--out {out} holds files that are not part of a bnn-probe report ({foreign[0]}{more}); "
                            "a report replaces its whole folder: choose another --out")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    check_replaceable(out)  # again: something may have been added while the report was built
    if _exchange(tmp, out):
        shutil.rmtree(tmp)  # now the previous report
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


@contextlib.contextmanager
def report_folder(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder to write the report into; move it to ``out_dir`` when the block succeeds."""
    out = Path(out_dir)
    check_replaceable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise BnnProbeError(f"cannot create the report folder next to {out}: {e.strerror or e}") from None
    try:
        yield tmp
        (tmp / MANIFEST).write_text("\n".join(_files(tmp)) + "\n", encoding="utf-8")
        _move_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f": {e.filename}" if e.filename else ""
        raise BnnProbeError(f"could not write the report into {out} ({e.strerror or type(e).__name__}{where}); "
                            "the previous report, if any, is unchanged") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
