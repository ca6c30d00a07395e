"""Figures of the inertia experiments (Theorem 1 with non-power-of-two C, flip hazard, Bop vs latent).

Like :mod:`bnn_probe.reports.figures`: each draws a prepared table, computes no statistics, returns the path or
``None`` when its data is missing. Per-seed lines are drawn as they are (no averaging in the figure).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import NullFormatter

from .figures import _empty, _figure, _grid, instrument


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
    """Hazard per inertia-in-steps bin (log–log): one panel per optimizer family (own x units), one line per
    configuration and kind (solid: first flips, dashed: re-flips, dotted: all flips); intervals shaded where a panel
    has one line."""
    if _empty(curve):
        return None
    d = curve[(curve["hazard"] > 0) & curve["x_mean"].gt(0)]
    if d.empty:
        return None
    d = d.assign(panel=d["family"].astype(str).str.split(":").str[0].str.strip())
    fams = list(dict.fromkeys(d["panel"]))
    nrows, ncols = _grid(len(fams))  # panels wrap into rows: every configuration drawn, the figure stays page-wide
    with _figure(path, ncols=ncols, nrows=nrows, width=4.8 * ncols, height=3.6 * nrows) as (fig, axes):
        for ax in axes.flat[len(fams):]:
            ax.set_visible(False)
        for ax, fam in zip(axes.flat, fams, strict=False):
            sub = d[d["panel"] == fam]
            lines = list(sub.groupby(["family", "kind"], sort=False))
            colors = dict(zip(dict.fromkeys(sub["family"]), sns.color_palette("tab10", sub["family"].nunique()) * 9,
                              strict=False))
            for (config, kind), g in lines:
                g = g.sort_values("x_mean")
                ls = "-" if str(kind).startswith("first") else "--" if str(kind).startswith("re") else ":"
                label = f"{str(config).split(':', 1)[-1].strip()} ({kind})"
                line = ax.plot(g["x_mean"], g["hazard"], marker="o", ms=3, lw=1, ls=ls, color=colors[config],
                               label=label)[0]
                if len(lines) <= 2:
                    lo = g["ci_lo"].where(g["ci_lo"] > 0)
                    ax.fill_between(g["x_mean"], lo, g["ci_hi"], color=line.get_color(), alpha=0.15)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow log range would print overlapping minor labels
            ax.axvline(1.0, color="grey", lw=0.8, ls=":")
            unit = " (|w̃|/|Δw̃|)" if fam.startswith("latent") else " ((τ − w·m)/|Δm|)"
            ax.set_xlabel("inertia in typical steps" + unit)
            ax.set_ylabel("P(flip at the next step)")
            n_conf = sub["family"].nunique()
            ax.set_title(fam + (f" — {n_conf} configurations" if n_conf > 1 else ""))
            if len(lines) <= 8:
                ax.legend(fontsize=6)
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
