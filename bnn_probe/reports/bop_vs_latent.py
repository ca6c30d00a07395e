"""Bop against latent-weight Adam from the same initial binary weights: do they flip the same weights?

Runs marked ``config["extra"]["bop_vs_latent"] = "bop" | "latent"`` with the same (seed, dataset, model, widths) form a
pair; every optimizer starts from the same ±1 draw for a seed (``bnn_probe.train.init_binary_weights``).
At each common sign snapshot t and layer (n weights):

    F_a(t), F_b(t): the weights whose sign differs from the shared initial signs, |F| = (1 − c2i_t)·n
    H(t) = Hamming distance of the two runs' signs = |F_a Δ F_b|
    shuffled-label baseline: E[H] if F_b were a random subset of its size, H_shuf = |F_a| + |F_b| − 2|F_a||F_b|/n
    overlap κ(t) = 1 − ΣH / ΣH_shuf over layers (Cohen's kappa of the "changed" indicators within one layer)

κ = 0: the two optimizers change no more common weights than chance given how many each changes; κ = 1: the same
weights. Statistic: κ at the last common snapshot, one value per seed; interval: t-interval over seeds.

What the claim is (and is not): both optimizers follow the sign of the same gradients, so an overlap beyond chance is
expected under the inertia view (Bop's m plays the role of a latent weight; Helwegen et al. 2019, Sec. 4) and is not
excluded by the approximation view. A supported verdict says the two methods choose overlapping sets of weights to
flip; it does not decide between the views.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import stats
from .frames import BOP_FAMILIES, config, family, frame, run_name
from .pairs import _hamming
from .render import Section

NEGLIGIBLE = 0.05  # κ below 0.05: no meaningful overlap beyond the shuffled baseline
MIN_SEEDS = 3
COLS = ["seed", "step", "bop", "latent", "n_weights", "hamming", "hamming_shuffled", "changed_bop", "changed_latent",
        "fraction", "fraction_shuffled", "kappa"]


def role(run) -> str | None:
    r = (config(run).get("extra") or {}).get("bop_vs_latent")
    return r if r in ("bop", "latent") else None


def pairs(runs) -> tuple[list[tuple], list[str]]:
    groups: dict[tuple, dict] = {}
    for run in runs:
        r = role(run)
        if r is None:
            continue
        c = config(run)
        key = (c.get("seed"), c.get("dataset"), c.get("model"), str(c.get("widths")))
        groups.setdefault(key, {}).setdefault(r, []).append(run)
    out, notes = [], []
    for key, g in groups.items():
        if len(g.get("bop", [])) != 1 or len(g.get("latent", [])) != 1:
            notes.append(f"Bop-vs-latent group seed {key[0]}: needs one Bop and one latent run, has "
                         f"{len(g.get('bop', []))} and {len(g.get('latent', []))}; skipped")
            continue
        a, b = g["bop"][0], g["latent"][0]
        if family(a) not in BOP_FAMILIES or family(b) != "latent":
            notes.append(f"Bop-vs-latent group seed {key[0]}: families {family(a)}/{family(b)}; skipped")
            continue
        out.append((key[0], a, b))
    return out, notes


def overlap(bop, latent) -> pd.DataFrame:
    """Network-level H, H_shuf and κ at every common snapshot of one pair (needs snapshots and c2i)."""
    ham = _hamming(frame(bop, "snapshots"), frame(latent, "snapshots"))
    sa, sb = frame(bop, "steps"), frame(latent, "steps")
    if ham.empty or "c2i" not in sa or "c2i" not in sb:
        return pd.DataFrame(columns=COLS[1:])
    m = ham.merge(sa[["step", "layer", "c2i"]], on=["step", "layer"]).merge(
        sb[["step", "layer", "c2i"]], on=["step", "layer"], suffixes=("_a", "_b"))
    n = m["n_weights"].astype(float)
    fa, fb = (1 - m["c2i_a"]) * n, (1 - m["c2i_b"]) * n
    m = m.assign(changed_bop=fa, changed_latent=fb, hamming_shuffled=fa + fb - 2 * fa * fb / n)
    g = m.groupby("step", as_index=False)[["n_weights", "hamming", "hamming_shuffled", "changed_bop",
                                             "changed_latent"]].sum()
    g = g[np.isfinite(g["hamming_shuffled"])]
    g["fraction"] = g["hamming"] / g["n_weights"]
    g["fraction_shuffled"] = g["hamming_shuffled"] / g["n_weights"]
    with np.errstate(invalid="ignore", divide="ignore"):
        g["kappa"] = np.where(g["hamming_shuffled"] > 0, 1 - g["hamming"] / g["hamming_shuffled"], np.nan)
    return g.assign(bop=run_name(bop), latent=run_name(latent))[COLS[1:]]


def analyse(runs) -> tuple[pd.DataFrame, list[str]]:
    found, notes = pairs(runs)
    parts = []
    for s, a, b in found:
        o = overlap(a, b)
        if o.empty:
            notes.append(f"{run_name(a)} / {run_name(b)}: no common sign snapshots with c2i; skipped")
            continue
        parts.append(o.assign(seed=s))
    df = pd.concat(parts, ignore_index=True)[COLS] if parts else pd.DataFrame(columns=COLS)
    return df, notes


def verdict(df: pd.DataFrame, negligible: float = NEGLIGIBLE, min_seeds: int = MIN_SEEDS) -> stats.Verdict:
    """``inertia.bop_vs_latent``: κ at the last common snapshot per seed; t-interval over seeds.

    Supported: the 95 % interval lies above 0; not supported: it lies below ``negligible``; otherwise, or with fewer
    than ``min_seeds`` seeds, inconclusive.
    """
    claim = ("Bop and latent-weight Adam started from the same binary weights change overlapping sets of weights: "
             "more common sign changes than a shuffled-label baseline with the same numbers of changes")
    method = ("κ = 1 − H/H_shuf at the last common sign snapshot (H: Hamming distance of the two runs' signs; H_shuf: "
              "its expectation if one run's changed weights were relabelled at random within each layer); one value "
              f"per seed, 95 % t-interval over seeds; not supported below {negligible:g}")
    runs = sorted(set(df["bop"]) | set(df["latent"])) if len(df) else []
    last = df.sort_values("step").groupby("seed").tail(1) if len(df) else df
    k = last["kappa"].to_numpy(dtype=float) if len(last) else np.array([])
    k = k[np.isfinite(k)]
    stat = float(k.mean()) if k.size else None
    if k.size < min_seeds:
        return stats.Verdict(claim, stats.INCONCLUSIVE, stat, None, int(k.size), runs, "κ (mean over seeds)", method,
                             f"{k.size} seed(s) < {min_seeds}", "inertia", "inertia.bop_vs_latent")
    v, why, ci = stats.verdict_mean_positive(k, negligible)
    return stats.Verdict(claim, v, stat, ci, int(k.size), runs, "κ (mean over seeds)", method, why, "inertia",
                         "inertia.bop_vs_latent")


def section(runs, w, opt) -> tuple[Section | None, list[stats.Verdict]]:
    """The report part: signs' Hamming distance over time against the shuffled baseline, κ per seed, the verdict."""
    from . import figures_inertia as FI

    df, notes = analyse(runs)
    if df.empty and not notes:
        return None, []
    v = verdict(df)
    s = Section("Bop against latent Adam from the same initial signs", anchor="bop-vs-latent")
    s.text("Both runs of a seed start from the same binary weights. Hamming distance of their signs over time, against "
           "the shuffled-label baseline (the distance expected if the weights each run changed were relabelled at "
           "random within each layer). Both optimizers follow the same gradient signs, so overlap is expected under "
           "either view of latent weights: this measures how alike the two methods' flip choices are, it does not "
           "decide between the views.")
    s.verdicts([v])
    s.figure(FI.bop_vs_latent(df, w.fig("bop_vs_latent")),
             "Sign Hamming distance between Bop and latent Adam (fraction of binary weights), observed and shuffled "
             "baseline, per seed")
    last = df.sort_values("step").groupby("seed").tail(1).sort_values("seed") if len(df) else df
    s.table(last, "Last common snapshot per seed", w.csv("bop_vs_latent_last", last))
    w.csv("bop_vs_latent", df)
    for n in notes:
        s.text(n)
    if not math.isfinite(v.statistic if v.statistic is not None else math.nan):
        s.text("No κ could be computed (snapshots or c2i missing).")
    return s, [v]
