"""Does feeding a report's recommended thresholds back equalise the layers' flip ratios? (report section)

A *feedback chain* is a run trained with one global τ (round 0), the run trained with the thresholds its report
recommended (``--threshold-policy from-report``; round 1), the run fed that run's report (round 2), and so on. The
chain is read from the runs' configs: a run whose ``threshold_policy`` is ``{"name": "from-report", "args": {"run":
SOURCE}}`` was fed the recommendation made from the run named SOURCE.

Per run, spread = coefficient of variation (std/mean over layers) of the per-layer flip ratios averaged over the
*whole* run (the fed run is judged on all its steps, not only on its end). Per chain and round k ≥ 1 the statistic is
the ratio CV_k / CV_0. The claim "feeding the recommendation back at least halves the spread" is tested per round
over chains (one chain per seed, the unit of replication): the mean of log(CV_k/CV_0) with a t-interval (90 %
two-sided, i.e. one-sided 95 % bounds), reported as a geometric-mean ratio. Supported when the upper bound is below
0.5; not supported when the lower bound is above 0.5; inconclusive otherwise or with fewer than 3 chains. Round 2
"does not undo" round 1 when its own verdict is supported too.

Verdict ids: ``thresholds.recommendation`` (round 1), ``thresholds.recommendation.round2`` (round 2).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps

from . import stats
from .frames import config, run_name
from .threshold_policies import cv
from .thresholds import layer_table

__all__ = ["feedback_chains", "feedback_verdicts", "section", "sources", "HALVING", "LEVEL"]

HALVING = 0.5
LEVEL = 0.90
MIN_CHAINS = 3
_COLS = ["chain", "round", "run", "seed", "cv", "cv_ratio", "mean_flip_ratio"]


def _source(run) -> str | None:
    pol = config(run).get("threshold_policy")
    if not isinstance(pol, dict) or pol.get("name") != "from-report":
        return None
    src = (pol.get("args") or {}).get("run")
    return str(src) if src else None


def sources(runs) -> dict[str, str]:
    """run → the run (by :func:`run_name`) whose recommended thresholds it was trained with, for the runs whose
    source is among ``runs``."""
    runs = list(runs)
    by_name: dict[str, object] = {}
    for r in runs:
        by_name.setdefault(run_name(r), r)
        by_name.setdefault(str(getattr(r, "name", "") or run_name(r)), r)
    out = {}
    for r in runs:
        src = _source(r)
        if src is not None and src in by_name:
            out[run_name(r)] = run_name(by_name[src])
    return out


def feedback_chains(runs) -> pd.DataFrame:
    """One row per run of a feedback chain: chain (its round-0 run), round, run, seed, CV of the per-layer flip
    ratios over the whole run, CV / CV of round 0, mean flip ratio over layers. Empty when no run was fed."""
    runs = list(runs)
    by_name: dict[str, object] = {}
    for r in runs:
        by_name.setdefault(run_name(r), r)
        by_name.setdefault(str(getattr(r, "name", "") or run_name(r)), r)
    parent = {run_name(r): _source(r) for r in runs}
    fed = {n for n, s in parent.items() if s is not None and s in by_name}
    if not fed:
        return pd.DataFrame(columns=_COLS)
    members: dict[str, tuple[str, int]] = {}
    for n in fed:
        k, cur, seen = 0, n, set()
        while cur in fed and cur not in seen:  # walk back to the unfed run (a cycle is not a chain)
            seen.add(cur)
            cur = run_name(by_name[parent[cur]])
            k += 1
        if cur in seen:
            continue
        members[n] = (cur, k)
        members.setdefault(cur, (cur, 0))
    chosen = [by_name[n] for n in members]
    lt = layer_table(chosen, window=1.0)
    rows = []
    for n, (root, k) in members.items():
        fr = lt.loc[lt["run"] == n, "flip_ratio"]
        rows.append({"chain": root, "round": k, "run": n, "seed": config(by_name[n]).get("seed"), "cv": cv(fr),
                     "mean_flip_ratio": float(fr.mean()) if len(fr) else math.nan})
    df = pd.DataFrame(rows)
    base = df[df["round"] == 0].set_index("chain")["cv"]
    df["cv_ratio"] = df["cv"] / df["chain"].map(base)
    return df[_COLS].sort_values(["chain", "round"], kind="stable").reset_index(drop=True)


def _round_verdict(chains: pd.DataFrame, k: int) -> stats.Verdict:
    sub = chains[(chains["round"] == k) & np.isfinite(chains["cv_ratio"].astype(float))
                 & (chains["cv_ratio"].astype(float) > 0)]
    runs = sorted(sub["run"])
    n = len(sub)
    vid = "thresholds.recommendation" if k == 1 else f"thresholds.recommendation.round{k}"
    claim = (f"Feeding the recommended thresholds back (round {k}) at least halves the spread of per-layer flip "
             "ratios (CV over layers, whole run) compared with the global-τ run")
    name = f"geometric mean of CV(round {k}) / CV(global τ)"
    method = f"mean of log ratios over chains (seeds), t-interval {LEVEL:.0%}; supported if the upper bound < 0.5"
    if n == 0:
        return stats.Verdict(claim, stats.INCONCLUSIVE, None, None, 0, [], name, method,
                             f"no feedback chain reaches round {k}", "thresholds", vid)
    lr = np.log(sub["cv_ratio"].astype(float).to_numpy())
    est = float(np.exp(lr.mean()))
    if n < 2:
        return stats.Verdict(claim, stats.INCONCLUSIVE, est, None, n, runs, name, method,
                             f"{n} chain (< {MIN_CHAINS} seeds)", "thresholds", vid)
    half = float(sps.t.ppf(0.5 + LEVEL / 2, n - 1) * lr.std(ddof=1) / math.sqrt(n))
    lo, hi = float(np.exp(lr.mean() - half)), float(np.exp(lr.mean() + half))
    if n < MIN_CHAINS:
        v, why = stats.INCONCLUSIVE, f"{n} chains (< {MIN_CHAINS} seeds)"
    elif hi < HALVING:
        v, why = stats.SUPPORTED, f"the upper bound {hi:.2f} is below {HALVING}"
    elif lo > HALVING:
        v, why = stats.NOT_SUPPORTED, f"the lower bound {lo:.2f} is above {HALVING}"
    else:
        v, why = stats.INCONCLUSIVE, f"the interval [{lo:.2f}, {hi:.2f}] contains {HALVING}"
    return stats.Verdict(claim, v, est, (lo, hi), n, runs, name, method, why, "thresholds", vid)


def feedback_verdicts(chains: pd.DataFrame) -> list[stats.Verdict]:
    """One verdict per round present (round 1: ``thresholds.recommendation``)."""
    if chains.empty:
        return []
    return [_round_verdict(chains, int(k)) for k in sorted(set(chains["round"])) if k >= 1]


def section(runs, w, opt) -> tuple[object | None, list[stats.Verdict]]:
    """The report section "Feeding the recommendation back", or ``(None, [])`` without feedback chains."""
    from .render import Section

    chains = feedback_chains(runs)
    if chains.empty:
        return None, []
    vs = feedback_verdicts(chains)
    sec = Section("3c. Feeding the recommended thresholds back", anchor="threshold-feedback")
    sec.text("Each chain starts with a run at one global τ; round k was trained with the thresholds recommended by "
             "the report of round k − 1 (--threshold-policy from-report). Spread: coefficient of variation over "
             "layers of the per-layer flip ratios averaged over the whole run. The verdicts compare each round "
             "with its chain's global-τ run, one chain per seed.")
    sec.verdicts(vs)
    sec.table(chains, "Feedback chains: spread of per-layer flip ratios per round", w.csv("threshold_feedback", chains))
    return sec, vs
