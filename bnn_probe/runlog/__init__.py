"""The versioned run log: a directory of JSON + Parquet + TensorBoard files (docs/runlog-format.md).

Example:
    >>> from bnn_probe.runlog import load_run, find_runs
    >>> runs = [load_run(p) for p in find_runs("runs/")]   # doctest: +SKIP
"""

from __future__ import annotations

from .reader import Run, find_runs, load_run, read_meta
from .schema import FORMAT, HIST_EDGES, SCHEMA_VERSION, TABLES, empty_frame
from .writer import RunWriter

__all__ = ["Run", "load_run", "find_runs", "read_meta", "RunWriter", "FORMAT", "SCHEMA_VERSION", "TABLES",
           "HIST_EDGES", "empty_frame"]
