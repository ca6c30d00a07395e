"""Figures of a report ("instruments"): each draws one prepared table and computes no statistics.

Every function takes its table(s) and an output path, returns the path written, or ``None`` (quietly) when its
data is missing. One style for all: seaborn whitegrid, colorblind palette, Agg backend.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

MAX_PANELS = 6
MAX_LEGEND = 12  # most runs named in one legend
PI_LABEL = "π = log(flip ratio + e⁻⁹)"
RAW = {"estimator": None, "errorbar": None}  # lines draw the prepared values: no aggregation, no bootstrap


def set_style() -> None:
    sns.set_theme(style="whitegrid", context="paper", palette="colorblind", font_scale=1.0)
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100})


@contextlib.contextmanager
def _figure(path: Path, ncols: int = 1, nrows: int = 1, width: float = 7.0, height: float = 3.6, **kw):
    set_style()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, **kw)
    try:
        with warnings.catch_warnings():  # library deprecation chatter (seaborn on newer matplotlib)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield fig, axes
        for ax in axes.flat:
            if not ax.has_data() and not ax.get_title():
                ax.set_visible(False)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def _panel_grid(n: int, max_cols: int = 3) -> tuple[int, int]:
    """(rows, columns) for n per-run panels, at most ``max_cols`` wide so titles and legends keep their room."""
    ncols = max(1, min(n, max_cols))
    return -(-n // ncols), ncols


def instrument(fn):
    """A figure that fails to draw is skipped with a warning; it never stops the report. A file-system error (disk
    full) is not the figure's fault: it propagates, and the report stops with one line (reports/atomic.py)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - a broken figure must not lose the verdicts
            warnings.warn(f"figure {fn.__name__} skipped: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            plt.close("all")
            return None

    return wrapper


def _empty(*dfs) -> bool:
    return any(df is None or len(df) == 0 for df in dfs)


@instrument
def training_curves(curves: pd.DataFrame, path: Path) -> Path | None:
    if _empty(curves):
        return None
    metrics = list(dict.fromkeys(curves["metric"]))[:4]
    n_runs = curves["run"].nunique()
    legend = n_runs <= MAX_LEGEND  # beyond that the colours cannot be told apart: the CSV names the runs
    with _figure(path, ncols=len(metrics), width=3.2 * len(metrics) + (2.2 if legend else 0), height=3.0) as (fig,
                                                                                                        axes):
        for ax, metric in zip(axes[0], metrics, strict=False):
            sns.lineplot(data=curves[curves["metric"] == metric], x="step", y="value", hue="run", ax=ax, **RAW,
                         legend=legend and ax is axes[0][-1])
            ax.set_title(metric if legend else f"{metric} ({n_runs} runs)")
            ax.set_ylabel("")
        if legend and axes[0][-1].get_legend() is not None:
            sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), fontsize=6, title_fontsize=7)
    return path


@instrument
def network_flip_ratio(net: pd.DataFrame, path: Path) -> Path | None:
    if _empty(net):
        return None
    with _figure(path) as (fig, axes):
        ax = axes[0][0]
        sns.lineplot(data=net, x="step", y="pi", hue="run", ax=ax, linewidth=1, **RAW)
        ax.set_ylabel(PI_LABEL)
        ax.set_title("Whole-network flip ratio")
    return path


@instrument
def layer_flip_ratio(lay: pd.DataFrame, path: Path) -> Path | None:
    if _empty(lay):
        return None
    runs = list(dict.fromkeys(lay["run"]))[:MAX_PANELS]
    nrows, ncols = _panel_grid(len(runs))
    with _figure(path, ncols=ncols, nrows=nrows, width=4.2 * ncols, height=3.2 * nrows, sharey=True) as (fig, axes):
        for ax, run in zip(axes.flat, runs, strict=False):
            sub = lay[lay["run"] == run].sort_values(["fan_in", "layer"], kind="stable")
            sns.lineplot(data=sub, x="step", y="pi", hue="layer", ax=ax, linewidth=0.8, legend=ax is axes[0][0], **RAW)
            ax.set_title(run)
            ax.set_ylabel(PI_LABEL)
        if axes[0][0].get_legend() is not None:
            sns.move_legend(axes[0][0], "lower left", fontsize=6, title_fontsize=7)
    return path


@instrument
def flip_heatmap(lay: pd.DataFrame, run: str, path: Path) -> Path | None:
    """Heatmap of π per layer (rows ordered by fan-in) over step bins, for one run."""
    sub = lay[lay["run"] == run] if not _empty(lay) else lay
    if _empty(sub):
        return None
    order = sub.drop_duplicates("layer").sort_values(["fan_in", "layer"], kind="stable")
    grid = sub.pivot_table(index="layer", columns="step", values="pi", aggfunc="mean").reindex(order["layer"])
    labels = [f"{r.layer} (fan-in {int(r.fan_in)})" if pd.notna(r.fan_in) else r.layer
              for r in order.itertuples(index=False)]
    with _figure(path, height=max(2.0, 0.35 * len(grid) + 1.2)) as (fig, axes):
        ax = axes[0][0]
        sns.heatmap(grid.to_numpy(dtype=float), ax=ax, cmap="viridis", cbar_kws={"label": PI_LABEL},
                    yticklabels=labels, xticklabels=False)
        steps = grid.columns.to_numpy()
        ticks = np.linspace(0, len(steps) - 1, min(6, len(steps))).astype(int)
        ax.set_xticks(ticks + 0.5)
        ax.set_xticklabels([f"{steps[i]:.0f}" for i in ticks])
        ax.set_xlabel("step")
        ax.set_title(f"{run}: flip ratio per layer (thin → wide)")
    return path


@instrument
def inertia_flip_probability(bins: pd.DataFrame, path: Path) -> Path | None:
    if _empty(bins):
        return None
    runs = list(dict.fromkeys(bins["run"]))[:MAX_PANELS]
    nrows, ncols = _panel_grid(len(runs))
    with _figure(path, ncols=ncols, nrows=nrows, width=4.4 * ncols, height=3.3 * nrows) as (fig, axes):
        for ax, run in zip(axes.flat, runs, strict=False):
            sub = bins[bins["run"] == run]
            for i, (layer, s) in enumerate(sub.groupby("layer", sort=False)):
                c = sns.color_palette()[i % 10]
                ax.errorbar(s["bin"] + 1, s["p_flip"], yerr=[s["p_flip"] - s["ci_lo"], s["ci_hi"] - s["p_flip"]],
                            marker="o", ms=3, lw=1, capsize=2, color=c, label=layer)
            ax.set_xlabel("inertia decile (1 = smallest)")
            ax.set_ylabel(f"P(flip within {int(sub['k'].iloc[0])} steps)")
            ax.set_title(f"{run} ({sub['family'].iloc[0]})")
        axes[0][0].legend(fontsize=6)
    return path


@instrument
def schedule_scatter(table: pd.DataFrame, path: Path) -> Path | None:
    if _empty(table):
        return None
    with _figure(path, width=5.5) as (fig, axes):
        ax = axes[0][0]
        sns.scatterplot(data=table, x="value", y="pi", hue="run", style="param", ax=ax)
        if (table["value"] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel("lr / γ in force")
        ax.set_ylabel(PI_LABEL)
        ax.set_title("Flip ratio against the schedule (20 windows per run)")
    return path


@instrument
def family_distributions(flip_ratio: pd.DataFrame, inertia: pd.DataFrame, path: Path) -> Path | None:
    if _empty(flip_ratio) and _empty(inertia):
        return None
    fams = sorted(set(flip_ratio.get("family", [])) | set(inertia.get("family", [])))
    ncols = 1 + max(1, len(fams))
    with _figure(path, ncols=ncols, width=3.2 * ncols, height=3.2) as (fig, axes):
        ax = axes[0][0]
        if not _empty(flip_ratio):
            sns.boxplot(data=flip_ratio, x="family", y="pi", hue="family", ax=ax, legend=False, fliersize=1)
        ax.set_ylabel(PI_LABEL)
        ax.set_title("flip ratio per step")
        for ax, fam in zip(axes[0][1:], fams, strict=False):
            sub = inertia[inertia["family"] == fam] if not _empty(inertia) else inertia
            if _empty(sub):
                ax.set_axis_off()
                continue
            v = sub["inertia"].astype(float)
            log = bool((v > 0).all() and v.max() / max(v.min(), 1e-300) > 100)
            sns.histplot(data=sub, x="inertia", hue="layer", ax=ax, element="step", fill=False, log_scale=log,
                         stat="density", common_norm=False, legend=False)
            ax.set_title(f"inertia, {fam}" + (" (τ − w·m)" if fam != "latent" else " (|w̃|)"))
    return path


@instrument
def quantile_ranges(table: pd.DataFrame, path: Path, prefix: str, title: str, xlabel: str) -> Path | None:
    """Per layer, the q05–q95 and q25–q75 ranges and median of ``{prefix}_qXX`` (rows ordered by fan-in)."""
    cols = [f"{prefix}_{q}" for q in ("q05", "q25", "q50", "q75", "q95")]
    if _empty(table) or not set(cols) <= set(table.columns):
        return None
    t = table.dropna(subset=cols)
    if t.empty:
        return None
    t = t.sort_values(["run", "fan_in", "layer"], kind="stable")
    labels = [f"{r.run} · {r.layer}" for r in t.itertuples(index=False)]
    y = np.arange(len(t))
    with _figure(path, width=6.5, height=max(2.2, 0.3 * len(t) + 1.0)) as (fig, axes):
        ax = axes[0][0]
        ax.hlines(y, t[cols[0]], t[cols[4]], color="0.6", lw=1)
        ax.hlines(y, t[cols[1]], t[cols[3]], color=sns.color_palette()[0], lw=4)
        ax.plot(t[cols[2]], y, "k|", ms=10)
        if (t[cols[0]] > 0).all():
            ax.set_xscale("log")
        if prefix.endswith("_rel"):
            ax.axvline(1.0, color="crimson", ls="--", lw=1, label="threshold")
            ax.legend(fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title)
    return path


@instrument
def never_chatter(table: pd.DataFrame, path: Path) -> Path | None:
    if _empty(table) or table[["never_flipped", "chattering"]].isna().all().all():
        return None
    t = table.dropna(subset=["never_flipped", "chattering"], how="all")
    long = t.melt(id_vars=["run", "layer", "fan_in"], value_vars=["never_flipped", "chattering"],
                  var_name="share", value_name="fraction")
    long["label"] = long["run"] + " · " + long["layer"]
    with _figure(path, width=6.5, height=max(2.4, 0.3 * len(t) + 1.2)) as (fig, axes):
        ax = axes[0][0]
        sns.barplot(data=long, y="label", x="fraction", hue="share", ax=ax, orient="h")
        ax.set_ylabel("")
        ax.set_xlabel("share of the layer's weights")
        ax.set_title("Weights that never flipped / chatter")
        ax.tick_params(axis="y", labelsize=7)
    return path


@instrument
def fan_in_law(points: pd.DataFrame, fit: pd.DataFrame, path: Path) -> Path | None:
    if _empty(points):
        return None
    with _figure(path, ncols=2, width=9, height=3.6) as (fig, axes):
        for ax, (col, q, lab) in zip(axes[0], (("abs_m_q50", "median |m|", "median |m|"),
                                               ("flip_ratio", "flip ratio", "flip ratio + e⁻⁹")), strict=True):
            pts = points.assign(y=points[col] + (math.exp(-9) if col == "flip_ratio" else 0))
            sns.scatterplot(data=pts, x="fan_in", y="y", hue="run", style="family", ax=ax)
            if not _empty(fit):
                for _key, s in fit[fit["quantity"] == q].groupby(["family", "run"]):
                    ax.plot(s["fan_in"], s["fitted"], lw=1, color="0.3")
                ref = fit[fit["quantity"] == q + " (-0.5 reference)"]
                if len(ref):
                    ax.plot(ref["fan_in"], ref["fitted"], ls="--", color="crimson", lw=1, label="slope −0.5")
            ax.set_xscale("log")
            if (pts["y"] > 0).all():
                ax.set_yscale("log")
            ax.set_xlabel("fan-in")
            ax.set_ylabel(lab)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    return path


@instrument
def thresholds(rec: pd.DataFrame, path: Path) -> Path | None:
    if _empty(rec) or rec["recommended_threshold"].isna().all():
        return None
    r = rec.dropna(subset=["recommended_threshold"])
    with _figure(path, width=5.5) as (fig, axes):
        ax = axes[0][0]
        sns.scatterplot(data=r, x="fan_in", y="recommended_threshold", hue="run", ax=ax, marker="o")
        sns.scatterplot(data=r, x="fan_in", y="threshold", ax=ax, marker="x", color="0.3", label="current τ")
        ax.set_xscale("log")
        if (r["recommended_threshold"] > 0).all():
            ax.set_yscale("log")
        ax.set_xlabel("fan-in")
        ax.set_ylabel("τ")
        ax.set_title("Recommended per-layer thresholds")
        ax.legend(fontsize=7)
    return path


@instrument
def hamming(ham: pd.DataFrame, title: str, path: Path) -> Path | None:
    if _empty(ham):
        return None
    with _figure(path, width=6) as (fig, axes):
        ax = axes[0][0]
        sns.lineplot(data=ham, x="step", y="fraction", hue="layer", marker="o", ax=ax, **RAW)
        ax.set_ylabel("Hamming distance / weights")
        ax.set_title(title)
    return path
