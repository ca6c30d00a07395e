"""Reports: analyses (pure functions of run DataFrames → results with statistic, interval, n and verdict), figures,
and the HTML/Markdown renderer. Entry point: :func:`build_report`.

Example:
    >>> from bnn_probe.reports import build_report
    >>> build_report(["runs/"], "report/")          # doctest: +SKIP
    PosixPath('report/report.html')
"""

from __future__ import annotations

from .build import FORMATS, ReportOptions, ReportResult, build_report, generate
from .pairs import Comparison, compare_runs
from .stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict

__all__ = ["build_report", "generate", "ReportResult", "ReportOptions", "FORMATS", "compare_runs", "Comparison",
           "Verdict", "SUPPORTED", "NOT_SUPPORTED", "INCONCLUSIVE"]
