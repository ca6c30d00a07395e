"""Section 2 of a report: the inertia interpretation of latent weights (Helwegen et al. 2019), tested on the logs.

* :func:`flip_probability` — P(flip within the next k steps) by inertia bins, from the ``tracked`` table, with
  bootstrap intervals, and a Spearman correlation of inertia with the flip outcome per (run, layer). Descriptive
  only: "larger inertia, fewer flips" holds for any continuous state read through a threshold, and ρ of a rare
  binary outcome is bounded by the flip rate; the verdict on inertia and flips is the hazard model
  (reports/hazard.py).
* :func:`schedule_effect` — flip ratio against the learning rate / γ in force (runs whose value changes in time).
* :func:`ema_horizon_notes` — Bop runs too short for γ's adaptivity role to be tested.
* :func:`family_distributions` — flip-ratio and inertia distributions of Bop and latent runs side by side.

Inertia (docs/runlog-format.md): latent runs |w̃_t|; Bop runs τ − w_t·m_t (distance to the flip threshold).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import stats
from .frames import BOP_FAMILIES, concat, family, frame, network_flips, pi_metric, run_name

MAX_TRACKED_ROWS = 200_000
FAMILY_LABEL = {"bop": "Bop", "bop2nd": "Bop2ndOrder", "latent": "latent-weight"}


@dataclass
class FlipProbability:
    bins: pd.DataFrame  # run, family, layer, bin, inertia_mid, inertia_lo, inertia_hi, flips, n, p_flip, ci_lo, ci_hi
    correlations: pd.DataFrame  # run, family, layer, rho, ci_lo, ci_hi, n_weights, n_rows, n_flips, k
    k: dict = field(default_factory=dict)  # run -> k used
    notes: list[str] = field(default_factory=list)


def _default_k(steps: np.ndarray, cadence: float) -> int:
    span = float(steps.max() - steps.min()) if steps.size else 0.0
    k = 10 * cadence
    if span > 0:
        k = min(k, max(cadence, span / 4))
    return max(1, int(round(k)))


def flip_outcomes(tracked: pd.DataFrame, k: int | None = None, max_rows: int = MAX_TRACKED_ROWS,
                  seed: int = 0) -> tuple[pd.DataFrame, int]:
    """For each tracked (step, layer, index) row: did the weight's sign change within the next k steps?

    A sign change between consecutive tracked samples s_prev < s is counted at step s. Rows whose horizon
    step + k runs past the weight's last tracked sample without a change are censored (dropped).
    With more than ``max_rows`` rows, whole weights are subsampled (their time series kept intact).
    Returns (DataFrame with layer, index, step, inertia, flipped; the k used).
    """
    cols = ["layer", "index", "step", "inertia", "flipped"]
    if tracked.empty or not {"step", "layer", "index", "sign", "inertia"} <= set(tracked.columns):
        return pd.DataFrame(columns=cols), k or 0
    codes, names = pd.factorize(tracked["layer"], sort=False)
    key = (codes.astype(np.int64) << 32) | tracked["index"].to_numpy(dtype=np.int64)
    step = tracked["step"].to_numpy(dtype=np.int64)
    sign = tracked["sign"].to_numpy()
    inert = tracked["inertia"].to_numpy(dtype=float)
    if len(key) > max_rows:  # subsample whole weights, keeping their time series
        ukeys = np.unique(key)
        rng = np.random.default_rng(seed)
        keep = rng.choice(ukeys, size=max(1, int(len(ukeys) * max_rows / len(key))), replace=False)
        m = np.isin(key, keep)
        key, step, sign, inert = key[m], step[m], sign[m], inert[m]
    order = np.lexsort((step, key))
    key, step, sign, inert = key[order], step[order], sign[order], inert[order]
    n = key.size
    same = np.r_[False, key[1:] == key[:-1]]
    changed = same & np.r_[False, sign[1:] != sign[:-1]]
    dstep = np.diff(step)[same[1:]]
    cadence = float(np.median(dstep)) if dstep.size else 1.0
    if k is None:
        k = _default_k(step, cadence)
    # next sign change after row i, within the same weight
    cpos = np.flatnonzero(changed)
    j = np.searchsorted(cpos, np.arange(n), side="right")
    has = j < cpos.size
    nxt_pos = np.where(has, cpos[np.minimum(j, max(cpos.size - 1, 0))] if cpos.size else 0, -1)
    has &= (nxt_pos >= 0) & (key[np.maximum(nxt_pos, 0)] == key)
    nxt = np.where(has, step[np.maximum(nxt_pos, 0)], np.iinfo(np.int64).max)
    # last tracked step of each weight
    ends = np.r_[np.flatnonzero(key[1:] != key[:-1]), n - 1]
    last = step[ends[np.searchsorted(ends, np.arange(n))]]
    flipped = has & (nxt - step <= k)
    observable = (flipped | (step + k <= last)) & np.isfinite(inert)
    codes_s = (key >> 32).astype(np.int64)[observable]
    out = pd.DataFrame({"layer": pd.Categorical.from_codes(codes_s, categories=names).astype(str)
                        if len(codes_s) else pd.Series([], dtype=str),
                        "index": (key & 0xFFFFFFFF)[observable], "step": step[observable],
                        "inertia": inert[observable], "flipped": flipped[observable]})
    return out.reset_index(drop=True), int(k)


def flip_probability(runs, k: int | None = None, n_bins: int = 10, n_boot: int = 1000,
                     max_rows: int = MAX_TRACKED_ROWS) -> FlipProbability:
    bins_out, corr_out, ks, notes = [], [], {}, []
    for run in runs:
        name, fam = run_name(run), family(run)
        out, kk = flip_outcomes(frame(run, "tracked"), k, max_rows)
        if out.empty:
            notes.append(f"{name}: no tracked weights with an observable horizon; skipped")
            continue
        ks[name] = kk
        pct = out.groupby("layer")["inertia"].rank(pct=True, method="average")
        out = out.assign(bin=np.clip(np.ceil(pct.to_numpy() * n_bins).astype(int) - 1, 0, n_bins - 1))
        g = out.groupby(["layer", "bin"]).agg(flips=("flipped", "sum"), n=("flipped", "size"),
                                              inertia_mid=("inertia", "median"), inertia_lo=("inertia", "min"),
                                              inertia_hi=("inertia", "max")).reset_index()
        g["p_flip"] = g["flips"] / g["n"]
        # intervals resample whole tracked weights (a weight's rows are correlated), per (layer, bin)
        per_w = out.groupby(["layer", "bin", "index"], sort=False)["flipped"].agg(["sum", "size"])
        ci = {key: stats.cluster_bootstrap_ratio_ci(sub["sum"], sub["size"], n_boot=n_boot)
              for key, sub in per_w.groupby(level=["layer", "bin"], sort=False)}
        lo = [ci[(lay, b)][0] for lay, b in zip(g["layer"], g["bin"], strict=True)]
        hi = [ci[(lay, b)][1] for lay, b in zip(g["layer"], g["bin"], strict=True)]
        bins_out.append(g.assign(ci_lo=lo, ci_hi=hi, n_weights=per_w.groupby(level=["layer", "bin"]).size()
                                 .reindex(pd.MultiIndex.from_frame(g[["layer", "bin"]])).to_numpy(),
                                 run=name, family=fam, k=kk))
        for layer, sub in out.groupby("layer", sort=False):
            n_w = int(sub["index"].nunique())
            c = stats.spearman_ci(sub["inertia"], sub["flipped"].astype(float), n_eff=n_w)
            corr_out.append({"run": name, "family": fam, "layer": layer, "rho": c.rho, "ci_lo": c.interval[0],
                             "ci_hi": c.interval[1], "n_weights": n_w, "n_rows": len(sub),
                             "n_flips": int(sub["flipped"].sum()), "k": kk})
    bins = pd.concat(bins_out, ignore_index=True) if bins_out else pd.DataFrame(
        columns=["layer", "bin", "flips", "n", "inertia_mid", "inertia_lo", "inertia_hi", "p_flip", "ci_lo", "ci_hi",
                 "n_weights", "run", "family", "k"])
    corr = pd.DataFrame(corr_out, columns=["run", "family", "layer", "rho", "ci_lo", "ci_hi", "n_weights", "n_rows",
                                           "n_flips", "k"])
    return FlipProbability(bins, corr, ks, notes)


@dataclass
class ScheduleEffect:
    table: pd.DataFrame  # run, family, param, window, step, value, flip_ratio, pi
    correlations: pd.DataFrame  # run, family, param, rho, ci_lo, ci_hi, n
    verdict: stats.Verdict | None


def _changes_over_time(steps: pd.DataFrame, param: str, rel: float = 1e-6) -> bool:
    """Whether ``param`` changes over steps within some layer by more than float noise (per-layer values that
    differ between layers but stay constant in time — e.g. Glorot lr factors — are not a schedule)."""
    v = steps[["layer", param]].dropna()
    if v.empty:
        return False
    g = v.groupby("layer")[param]
    span = (g.max() - g.min()) / g.max().abs().replace(0, np.nan)
    return bool((span > rel).any())


def schedule_effect(runs, n_windows: int = 20, negligible: float = 0.1, min_seeds: int = 3) -> ScheduleEffect:
    """Flip ratio against the lr (latent) or γ (Bop) in force, averaged over ``n_windows`` step windows per run.

    Only runs whose parameter changes over time (within a layer) enter; identical runs count once. The statistic is
    the mean over runs of the per-run Spearman ρ (value in force vs window flip ratio), with a t-interval over runs
    (the run is the unit); ≥ ``min_seeds`` seeds or inconclusive. The correlation is observational: it is confounded
    with training time (flip ratios also fall as a network converges); the report says so.
    """
    from . import pools

    runs, _ = pools.dedupe(runs)
    rows, corrs = [], []
    for run in runs:
        steps = frame(run, "steps")
        fam = family(run)
        param = "gamma" if fam in BOP_FAMILIES else "lr"
        if steps.empty or param not in steps or not _changes_over_time(steps, param):
            continue
        nf = network_flips(steps, frame(run, "layers"))
        hp = steps.groupby("step")[param].median()
        nf = nf.assign(value=nf["step"].map(hp))
        smin, smax = nf["step"].min(), nf["step"].max()
        width = (smax - smin + 1) / n_windows
        nf = nf.assign(window=((nf["step"] - smin) // width).astype(int))
        w = nf.groupby("window").agg(step=("step", "mean"), value=("value", "mean"), flips=("flips", "sum"),
                                     n_weights=("n_weights", "sum")).reset_index()
        w["flip_ratio"] = w["flips"] / w["n_weights"]
        w["pi"] = pi_metric(w["flip_ratio"])
        rows.append(w.assign(run=run_name(run), family=fam, param=param))
        c = stats.spearman_ci(w["value"], w["flip_ratio"])
        corrs.append({"run": run_name(run), "family": fam, "param": param, "seed": pools.seed(run), "rho": c.rho,
                      "ci_lo": c.interval[0], "ci_hi": c.interval[1], "n": c.n})
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["window", "step", "value", "flips", "n_weights", "flip_ratio", "pi", "run", "family", "param"])
    corr = pd.DataFrame(corrs, columns=["run", "family", "param", "seed", "rho", "ci_lo", "ci_hi", "n"])
    claim = "Decaying the learning rate / γ adds inertia: the flip ratio falls with the lr/γ in force"
    method = ("per run whose lr/γ changes over time: Spearman rho between the value in force and the network flip "
              "ratio over 20 step windows; mean over runs with a t-interval (unit: run); observational (confounded "
              "with training time)")
    rho = corr["rho"].to_numpy(dtype=float)
    rho = rho[np.isfinite(rho)]
    seeds = corr["seed"].nunique()
    mean = float(rho.mean()) if rho.size else None
    if corr.empty:
        verdict = stats.Verdict(claim, stats.INCONCLUSIVE, None, None, 0, [], "Spearman rho", method,
                                "no run whose lr/γ changes over time", "inertia", "schedules.flip_ratio")
    elif rho.size < min_seeds or seeds < min_seeds:
        verdict = stats.Verdict(claim, stats.INCONCLUSIVE, mean, None, int(rho.size), sorted(corr["run"]),
                                "Spearman rho (mean over runs)", method,
                                f"{seeds} seed(s) / {rho.size} run(s) < {min_seeds}", "inertia", "schedules.flip_ratio")
    else:
        v, reason, ci = stats.verdict_mean_positive(rho, negligible)
        verdict = stats.Verdict(claim, v, mean, ci, int(rho.size), sorted(corr["run"]),
                                "Spearman rho (mean over runs)", method, reason, "inertia", "schedules.flip_ratio")
    return ScheduleEffect(table, corr, verdict)


def ema_horizon_notes(runs, min_time_constants: float = 3.0) -> list[str]:
    """Bop-family runs shorter than ``min_time_constants`` EMA time constants 1/γ: there m_t ≈ γ·Σ g (the average
    barely forgets), so γ and τ act only through τ/γ and γ's role as an adaptivity rate is not tested."""
    short = []
    for run in runs:
        steps = frame(run, "steps")
        if family(run) not in BOP_FAMILIES or steps.empty or "gamma" not in steps:
            continue
        gamma = float(steps["gamma"].median())
        n = int(steps["step"].max())
        if gamma > 0 and n * gamma < min_time_constants:
            short.append(f"{run_name(run)} ({n} steps × γ {gamma:g} = {n * gamma:.2g})")
    if not short:
        return []
    return [f"γ's adaptivity role is not tested by these runs: they last fewer than {min_time_constants:g} EMA time "
            "constants 1/γ (steps × γ < 3), so m ≈ γ·Σg barely forgets and γ and τ act only through τ/γ — runs with "
            "equal τ/γ must flip alike: " + "; ".join(short[:12]) + (" …" if len(short) > 12 else "")]


@dataclass
class FamilyDistributions:
    flip_ratio: pd.DataFrame  # run, family, step, flip_ratio, pi (network, per step; subsampled)
    inertia: pd.DataFrame  # run, family, layer, inertia (tracked sample; subsampled)
    summary: pd.DataFrame  # family, quantity, n, q05, q25, q50, q75, q95


def family_distributions(runs, max_points: int = 5000, seed: int = 0) -> FamilyDistributions:
    fr, inert = [], []
    for run in runs:
        name, fam = run_name(run), family(run)
        steps = frame(run, "steps")
        if not steps.empty:
            nf = network_flips(steps, frame(run, "layers"))
            if len(nf) > max_points:
                nf = nf.sample(max_points, random_state=seed)
            fr.append(nf[["step", "flip_ratio"]].assign(run=name, family=fam, pi=pi_metric(nf["flip_ratio"])))
        tr = frame(run, "tracked")
        if not tr.empty and "inertia" in tr:
            t = tr[["layer", "inertia"]]
            if len(t) > max_points:
                t = t.sample(max_points, random_state=seed)
            inert.append(t.assign(run=name, family=fam))
    fr_df = concat(fr, ["step", "flip_ratio", "run", "family", "pi"])
    in_df = concat(inert, ["layer", "inertia", "run", "family"])
    summ = []
    for q, df, col in (("flip_ratio", fr_df, "flip_ratio"), ("inertia", in_df, "inertia")):
        for fam, sub in df.groupby("family"):
            v = sub[col].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if v.size == 0:
                continue
            qs = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
            summ.append({"family": fam, "quantity": q, "n": int(v.size),
                         **{f"q{int(p * 100):02d}": x for p, x in zip([0.05, 0.25, 0.5, 0.75, 0.95], qs, strict=True)}})
    summary = pd.DataFrame(summ, columns=["family", "quantity", "n", "q05", "q25", "q50", "q75", "q95"])
    return FamilyDistributions(fr_df, in_df, summary)

