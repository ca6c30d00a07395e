"""The probe's run checks (meta.json ``"warnings"``, bnn_probe/probe/checks.py) in the report and ``summary``.

Runs with a *blocking* warning — ``dead_gradients`` (no weight of a layer can flip), ``nonfinite_state`` (NaN/Inf in
the optimizer state), ``not_binarized`` (a measured parameter is not binary in the forward pass) — are left out of the
report's analyses and verdicts, and the report says so at the top; the other kinds (``non_binary_weights``,
``changed_outside_step``, ``binarizer_zeros``) flag the run at the top of the report and its verdicts keep it.
When every run is blocked, none is left out (the report would be empty) and all are flagged instead.
"""

from __future__ import annotations

from typing import Any

from .frames import meta, run_name

__all__ = ["BLOCKING", "run_warnings", "exclude_blocking", "messages"]

BLOCKING = ("dead_gradients", "nonfinite_state", "not_binarized")


def run_warnings(run) -> list[dict[str, Any]]:
    """The warnings a run's probe recorded (an empty list for runs written before the checks existed)."""
    ws = meta(run).get("warnings") or []
    return [w for w in ws if isinstance(w, dict) and "kind" in w]


def _line(run, ws: list[dict[str, Any]]) -> str:
    parts = [f"{w['kind']} in {w.get('layer', '?')} (step {w.get('step', '?')})" for w in ws]
    return f"{run_name(run)}: " + "; ".join(parts)


def exclude_blocking(runs: list) -> tuple[list, list[str]]:
    """(runs without a blocking warning, one report warning per run left out)."""
    keep, notes = [], []
    for r in runs:
        bad = [w for w in run_warnings(r) if w["kind"] in BLOCKING]
        if bad:
            notes.append(f"left out of the analyses and verdicts: {_line(r, bad)}")
        else:
            keep.append(r)
    if not keep:
        return list(runs), [f"kept although blocked (every run is): {n.split(': ', 1)[1]}" for n in notes]
    return keep, notes


def messages(runs: list) -> list[str]:
    """One report warning per kept run that carries non-blocking warnings (its verdicts include it)."""
    out = []
    for r in runs:
        ws = [w for w in run_warnings(r) if w["kind"] not in BLOCKING]
        if ws:
            out.append(f"probe warnings (the verdicts include this run): {_line(r, ws)}")
    return out
