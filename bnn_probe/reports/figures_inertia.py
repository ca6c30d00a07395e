"""Figures of the inertia experiments (Theorem 1 with non-power-of-two C, flip hazard, Bop vs latent).

Like :mod:`bnn_probe.reports.figures`: each draws a prepared table, computes no statistics, returns the path or
``None`` when its data is missing. Per-seed lines are drawn as they are (no averaging in the figure).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from .figures import _empty, _figure, instrument


@instrument
def theorem1(traj: pd.DataFrame, path: Path) -> Path | None:
    """Hamming fraction from the unscaled run over steps: one panel per arm, colour = C (dashed: rounding control),
    one line per seed."""
    if _empty(traj):
        return None
    d = traj.assign(label=np.where(traj["role"] == "rounding", "rounding control",
                                   "C = " + traj["C"].map(lambda c: f"{c:g}")))
    arms = [a for a in ("unclipped", "clipped") if a in set(d["arm"])]
    cs = sorted(set(d.loc[d["role"] == "scaled", "C"]))
    order = [f"C = {c:g}" for c in cs] + (["rounding control"] if (d["role"] == "rounding").any() else [])
    palette = dict(zip(order, [*sns.color_palette("viridis", len(cs)), (0.5, 0.5, 0.5)], strict=False))
    with _figure(path, ncols=len(arms), width=5.5 * len(arms), height=3.6, sharey=True) as (fig, axes):
        for ax, arm in zip(axes[0], arms, strict=True):
            sub = d[d["arm"] == arm]
            sns.lineplot(data=sub, x="step", y="fraction", hue="label", hue_order=order, palette=palette, units="seed",
                         estimator=None, ax=ax, style="role", dashes={"scaled": "", "rounding": (3, 2)}, lw=1)
            ax.set_title("identity STE, no clipping" if arm == "unclipped" else "clipped STE, clipping at 1")
            ax.set_ylabel("Hamming distance / binary weights")
    return path


@instrument
def hazard(curve: pd.DataFrame, path: Path) -> Path | None:
    """Hazard per inertia-in-steps bin (log–log), first flips and re-flips, one panel per family (own x units)."""
    if _empty(curve):
        return None
    d = curve[(curve["hazard"] > 0) & curve["x_mean"].gt(0)]
    if d.empty:
        return None
    fams = list(dict.fromkeys(d["family"]))
    with _figure(path, ncols=len(fams), width=4.8 * len(fams), height=3.6) as (fig, axes):
        for ax, fam in zip(axes[0], fams, strict=True):
            sub = d[d["family"] == fam]
            for kind, g in sub.groupby("kind", sort=False):
                g = g.sort_values("x_mean")
                line = ax.plot(g["x_mean"], g["hazard"], marker="o", label=kind)[0]
                lo = g["ci_lo"].where(g["ci_lo"] > 0)
                ax.fill_between(g["x_mean"], lo, g["ci_hi"], color=line.get_color(), alpha=0.15)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.axvline(1.0, color="grey", lw=0.8, ls=":")
            unit = " (|w̃|/|Δw̃|)" if fam.startswith("latent") else " ((τ − w·m)/|Δm|)"
            ax.set_xlabel("inertia in typical steps" + unit)
            ax.set_ylabel("P(flip at the next step)")
            ax.set_title(fam)
            ax.legend(fontsize=7)
    return path


@instrument
def bop_vs_latent(df: pd.DataFrame, path: Path) -> Path | None:
    """Observed and shuffled-baseline Hamming fraction between the Bop and latent runs of each seed over steps."""
    if _empty(df):
        return None
    long = pd.concat([df.assign(kind="observed", value=df["fraction"]),
                      df.assign(kind="shuffled-label baseline", value=df["fraction_shuffled"])], ignore_index=True)
    with _figure(path, width=6.5) as (fig, axes):
        ax = axes[0][0]
        sns.lineplot(data=long, x="step", y="value", hue="kind", units="seed", estimator=None, ax=ax, lw=1)
        ax.set_ylabel("Hamming distance / binary weights")
        ax.set_title("Bop vs latent Adam, same initial signs")
    return path
