"""Theorem 1 of Helwegen et al. (2019) as an experiment, not a floating-point identity.

Theorem 1: for latent-weight training whose (pseudo-)gradient does not depend on |w̃| (identity STE, no clipping),
scaling the learning rate α and the initial latent weights w̃_0 by one constant C gives w̃_t(C) = C · w̃_t(1), so the
binary weights sign(w̃_t) are unchanged. With a power-of-two C the scaled run is bit-identical (scaling by 2^k commutes
with float rounding) — a code test (tests/test_equivalences.py), not evidence. With C ∈ {3, 10, 100} the products
round differently, and a weight that lands within rounding of 0 can flip one step earlier or later; after that the
two runs differ in their gradients. So "identical up to rounding" is measured against a *rounding control*: the
same scaling with C = 1 + 2^-22 (α and w̃_0 change by a few units in the last place, so every step rounds
differently, and nothing else changes). With clipping to [−1, 1] and the clipped STE (gradient 0 where |w̃| > 1)
the magnitude matters on its own, and the scaled runs must diverge once the scaled weights reach the bound.

Runs of the experiment carry ``config["extra"]["theorem1"] = {"C": C, "arm": "unclipped" | "clipped",
"role": "reference" | "scaled" | "rounding"}`` (``bnn-probe study inertia`` writes them); runs of one (arm, seed,
dataset, model) form a group whose reference is the C = 1 run.

Statistic: the Hamming distance of the binary weights from the group's reference, as a fraction of all binary weights,
at the sign snapshots (time-averaged over the run: H̄), and the first step whose per-layer sign hash differs.
The unit is the seed (one group per arm and seed).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import BnnProbeError
from . import stats
from .frames import config, run_name
from .pairs import compare_runs
from .render import Section

ARMS = ("unclipped", "clipped")
SCALED_MARGIN = 0.01  # H̄_scaled − H̄_rounding below 1 % of the weights counts as "equal up to rounding"
DIVERGE_MARGIN = 0.001  # H̄_clipped − H̄_rounding below 0.1 % of the weights counts as "no divergence"
MIN_SEEDS = 3
TRAJ_COLS = ["arm", "seed", "C", "role", "run", "step", "hamming", "n_weights", "fraction"]
SUMMARY_COLS = ["arm", "seed", "C", "role", "run", "reference", "first_difference_step", "steps_compared",
                "mean_fraction", "final_fraction"]


def info(run) -> dict | None:
    """The run's Theorem-1 marker (``config.extra.theorem1``), or None."""
    t = (config(run).get("extra") or {}).get("theorem1")
    if not isinstance(t, dict) or t.get("arm") not in ARMS or t.get("role") not in ("reference", "scaled", "rounding"):
        return None
    return t


def _group_key(run, t: dict) -> tuple:
    c = config(run)
    return (t["arm"], c.get("seed"), c.get("dataset"), c.get("model"), str(c.get("widths")))


def trajectories(runs) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Hamming distance of every scaled and rounding-control run from its group's reference over time.

    Returns (trajectories: one row per (run, snapshot step) with the network-level Hamming distance; summary: one
    row per compared run with the first differing step from the sign hashes, H̄ and the final fraction; notes).
    """
    groups: dict[tuple, list] = {}
    for run in runs:
        t = info(run)
        if t is not None:
            groups.setdefault(_group_key(run, t), []).append((run, t))
    traj, summ, notes = [], [], []
    for key, members in groups.items():
        refs = [r for r, t in members if t["role"] == "reference"]
        if len(refs) != 1:
            notes.append(f"Theorem-1 group {key[:2]}: {len(refs)} reference runs (need exactly 1); skipped")
            continue
        ref = refs[0]
        for run, t in members:
            if run is ref:
                continue
            try:
                c = compare_runs(ref, run)
            except BnnProbeError as e:
                notes.append(f"{run_name(run)}: {e}; skipped")
                continue
            ham = c.hamming
            if len(ham):
                net = ham.groupby("step", as_index=False)[["hamming", "n_weights"]].sum()
                net["fraction"] = net["hamming"] / net["n_weights"].astype(float)
            else:
                net = pd.DataFrame(columns=["step", "hamming", "n_weights", "fraction"])
                notes.append(f"{run_name(run)}: no sign snapshots shared with {run_name(ref)}")
            base = {"arm": key[0], "seed": key[1], "C": float(t["C"]), "role": t["role"], "run": run_name(run)}
            traj.append(net.assign(**base))
            frac = net["fraction"].to_numpy(dtype=float)
            summ.append({**base, "reference": run_name(ref), "first_difference_step": c.first_difference_step,
                         "steps_compared": c.n_steps_compared,
                         "mean_fraction": float(frac.mean()) if frac.size else math.nan,
                         "final_fraction": float(frac[-1]) if frac.size else math.nan})
    tdf = pd.concat(traj, ignore_index=True)[TRAJ_COLS] if traj else pd.DataFrame(columns=TRAJ_COLS)
    sdf = pd.DataFrame(summ, columns=SUMMARY_COLS).sort_values(["arm", "C", "seed"]).reset_index(drop=True)
    return tdf, sdf, notes


def _excess(summary: pd.DataFrame, arm: str) -> pd.DataFrame:
    """Per (seed, C) of ``arm``: H̄ of the scaled run minus H̄ of the seed's rounding control (0 without one)."""
    sub = summary[summary["arm"] == arm]
    ctrl = sub[sub["role"] == "rounding"].groupby("seed")["mean_fraction"].first()
    sc = sub[sub["role"] == "scaled"]
    return sc.assign(rounding=sc["seed"].map(ctrl).fillna(0.0).to_numpy(),
                     excess=sc["mean_fraction"].to_numpy() - sc["seed"].map(ctrl).fillna(0.0).to_numpy())


def scaled_verdict(summary: pd.DataFrame, margin: float = SCALED_MARGIN, min_seeds: int = MIN_SEEDS) -> stats.Verdict:
    """``theorem1.scaled``: without clipping, scaled runs match the unscaled one up to rounding-driven divergence.

    Per C and seed, D = H̄_scaled(C) − H̄_rounding (time-averaged Hamming fractions against the C = 1 reference).
    Non-inferiority per C (one-sided test: the upper end of the 90 % t-interval of the mean of D over seeds below
    ``margin``), combined as an intersection–union test: supported when every C passes (no multiplicity correction
    is needed for "all pass"); not supported when some C's 95 % interval lies above the margin; else inconclusive.
    The statistic shown is that of the worst C (the highest upper bound). Diverging *less* than the rounding control
    is no evidence against the claim.
    """
    claim = ("Theorem 1 without clipping: scaling lr and w̃_0 by C ∈ {3, 10, 100} keeps the binary trajectory, up to "
             "rounding-driven divergence (no more than the rounding control C = 1 + 2^-22 shows)")
    method = (f"per C and seed: D = H̄_scaled − H̄_rounding, H̄ = time-averaged Hamming fraction from the C = 1 run at "
              f"the sign snapshots; per C non-inferiority with margin {margin:g} (upper end of the 90 % t-interval of "
              "the mean over seeds), all C must pass (intersection–union test); statistic and 95 % interval of the "
              "worst C; unit: seed")
    ex = _excess(summary, "unclipped")
    per_c = {c: g.groupby("seed")["excess"].mean() for c, g in ex.groupby("C")}
    if not per_c:
        return _seed_verdict(pd.Series(dtype=float), claim, method, "theorem1.scaled", equivalence=margin,
                             min_seeds=min_seeds, runs=[])
    upper = {c: stats.mean_t_interval(v, 0.90)[1] for c, v in per_c.items()}
    worst = max(per_c, key=lambda c: upper[c] if math.isfinite(upper[c]) else math.inf)
    v = _seed_verdict(per_c[worst], claim, method, "theorem1.scaled", equivalence=margin, min_seeds=min_seeds,
                      runs=sorted(ex["run"]))
    above = [c for c, d in per_c.items() if len(d) >= min_seeds and stats.mean_t_interval(d)[0] > margin]
    if v.verdict != stats.INCONCLUSIVE or len(per_c[worst]) >= min_seeds:
        if above:
            v.verdict, v.reason = stats.NOT_SUPPORTED, (f"C = {', '.join(f'{c:g}' for c in above)}: the 95 % interval "
                                                        f"lies above the margin {margin:g}")
        else:
            v.reason = f"worst C = {worst:g}: {v.reason}"
    v.statistic_name = f"mean over seeds of H̄_scaled − H̄_rounding (worst C = {worst:g})"
    return v


def clipping_verdict(summary: pd.DataFrame, margin: float = DIVERGE_MARGIN,
                     min_seeds: int = MIN_SEEDS) -> stats.Verdict:
    """``theorem1.clipping``: with clipping and the clipped STE, the scaled runs diverge from the unscaled one.

    Per seed, E = H̄_clipped(C_max) − H̄_rounding (the largest C of the arm). Supported when the 95 % t-interval of
    the mean of E over seeds lies above ``margin``; not supported when it lies below it (no divergence beyond
    rounding). How fast divergence grows with C is reported in the table (first differing step and H̄ per C).
    """
    claim = ("Theorem 1 needs an |w̃|-independent gradient: with clipping to [−1, 1] and the clipped STE, scaling lr "
             "and w̃_0 by C changes the binary trajectory beyond rounding")
    method = (f"per seed: E = H̄_scaled(largest C) − H̄_rounding in the clipped arm (time-averaged Hamming fractions "
              f"from the C = 1 run); supported if the 95 % t-interval of the mean over seeds lies above {margin:g}, "
              "not supported if below; unit: seed")
    ex = _excess(summary, "clipped")
    if ex.empty:
        per_seed = pd.Series(dtype=float)
    else:
        per_seed = ex[ex["C"] == ex["C"].max()].groupby("seed")["excess"].mean()
    return _seed_verdict(per_seed, claim, method, "theorem1.clipping", threshold=margin, min_seeds=min_seeds,
                         runs=sorted(ex["run"]))


def _seed_verdict(per_seed: pd.Series, claim: str, method: str, vid: str, *, min_seeds: int, runs: list[str],
                  equivalence: float | None = None, threshold: float | None = None) -> stats.Verdict:
    v = per_seed.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    n = int(v.size)
    name = "mean over seeds of H̄ excess"
    if n == 0:
        return stats.Verdict(claim, stats.INCONCLUSIVE, None, None, 0, runs, name, method,
                             "no Theorem-1 runs of this arm", "theorem1", vid)
    mean = float(v.mean())
    if n < min_seeds:
        return stats.Verdict(claim, stats.INCONCLUSIVE, mean, None, n, runs, name, method,
                             f"{n} seed(s) < {min_seeds}", "theorem1", vid)
    ci95 = stats.mean_t_interval(v, 0.95)
    if equivalence is not None:
        ci90 = stats.mean_t_interval(v, 0.90)
        bound = f"one-sided 95 % upper bound (90 % interval's upper end) {ci90[1]:.3g}"
        if ci90[1] < equivalence:
            verdict, why = stats.SUPPORTED, f"{bound} below the margin {equivalence:g}"
        elif ci95[0] > equivalence:
            verdict, why = stats.NOT_SUPPORTED, f"the 95 % interval lies above the margin {equivalence:g}"
        else:
            verdict, why = stats.INCONCLUSIVE, f"{bound} beyond the margin {equivalence:g}"
        return stats.Verdict(claim, verdict, mean, ci95, n, runs, name, method, why, "theorem1", vid)
    assert threshold is not None
    if ci95[0] > threshold:
        verdict, why = stats.SUPPORTED, f"the 95 % interval lies above {threshold:g}"
    elif ci95[1] < threshold:
        verdict, why = stats.NOT_SUPPORTED, f"the 95 % interval lies below {threshold:g}: no divergence"
    else:
        verdict, why = stats.INCONCLUSIVE, f"the interval contains {threshold:g}"
    return stats.Verdict(claim, verdict, mean, ci95, n, runs, name, method, why, "theorem1", vid)


def by_c(summary: pd.DataFrame) -> pd.DataFrame:
    """How fast the runs diverge per (arm, C): seeds, median first differing step, mean H̄ and final fraction."""
    if summary.empty:
        return pd.DataFrame(columns=["arm", "C", "role", "n_seeds", "first_difference_median", "n_identical",
                                     "mean_fraction", "final_fraction"])
    g = summary.groupby(["arm", "role", "C"], as_index=False)
    return g.agg(n_seeds=("seed", "nunique"),
                 first_difference_median=("first_difference_step", "median"),
                 n_identical=("first_difference_step", lambda s: int(s.isna().sum())),
                 mean_fraction=("mean_fraction", "mean"), final_fraction=("final_fraction", "mean"))


def section(runs, w, opt) -> tuple[Section | None, list[stats.Verdict]]:
    """The report part: Hamming distance from the unscaled run over time per C and arm, and both verdicts."""
    from . import figures_inertia as FI

    traj, summary, notes = trajectories(runs)
    if summary.empty and not notes:
        return None, []
    vs = [scaled_verdict(summary), clipping_verdict(summary)]
    s = Section("Theorem 1 with non-power-of-two C", anchor="theorem1")
    s.text("Latent SGD runs with lr and w̃_0 scaled by C, against the C = 1 run of the same seed, in two arms: "
           "identity STE without clipping (Theorem 1 applies) and clipped STE with clipping to [−1, 1] (it does not). "
           "The rounding control scales both by C = 1 + 2^-22: the divergence rounding alone causes. "
           "A power-of-two C gives bit-identical runs; that identity is a code test, not part of this verdict.")
    s.verdicts(vs)
    s.figure(FI.theorem1(traj, w.fig("theorem1_scaled")),
             "Hamming distance of the binary weights from the unscaled run (fraction of all binary weights) per C, "
             "one line per seed")
    tab = by_c(summary)
    s.table(tab, "Divergence per arm and C (first differing step from the per-step sign hashes)",
            w.csv("theorem1_by_c", tab))
    w.csv("theorem1_runs", summary)
    w.csv("theorem1_hamming", traj)
    for n in notes:
        s.text(n)
    return s, vs
