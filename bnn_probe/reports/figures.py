"""Figures of a report ("instruments"): each draws one prepared table and computes no statistics.

Every function takes its table(s) and an output path, returns the path written, or ``None`` (quietly) when its
data is missing. One style for all: seaborn whitegrid, colorblind palette, Agg backend. Rules: legends sit outside
the axes (or lines are labelled at their ends); many runs become small multiples, never one crowded axis; τ, |m|,
|m|/τ and flip probabilities use log axes; Bop's |m| and Bop2ndOrder's m̂ never share an axis; every run is drawn
somewhere, and a figure that summarises says so in its title or caption; linear axes carry at most a few ticks.
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
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter  # noqa: E402

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
        fig.savefig(path, format="png", bbox_inches="tight", pad_inches=0.05)  # legends outside the axes stay in
    finally:
        plt.close(fig)


MAX_COLS = 4  # small multiples per row
PANEL_W, PANEL_H = 3.0, 1.65  # inches per small-multiple panel


def _legend_outside(ax, fontsize: float = 6.5, title: str | None = None) -> None:
    """The axes' legend to the right of the axes, never over the data."""
    h, lab = ax.get_legend_handles_labels()
    if h:
        ax.legend(h, lab, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=fontsize, frameon=False,
                  title=title, title_fontsize=fontsize, borderaxespad=0.0)


def _short(name: str, group: str) -> str:
    """A run's name without its group's prefix (``thresholds-global-t1e-6-s0`` in group thresholds → ``global-…``)."""
    return name[len(group) + 1:] if name.startswith(group + "-") and len(name) > len(group) + 1 else name


def _few_ticks(ax, x: int = 4, y: int = 4) -> None:
    """At most ``x``/``y`` ticks on linear axes, so tick labels never run into each other."""
    if ax.get_xscale() == "linear":
        ax.xaxis.set_major_locator(MaxNLocator(x))
    if ax.get_yscale() == "linear":
        ax.yaxis.set_major_locator(MaxNLocator(y))


def _log_if_positive(ax, values, axis: str = "y") -> bool:
    """A log axis when the values have a positive entry (non-positive ones are clipped off the axis)."""
    v = pd.to_numeric(pd.Series(np.asarray(values).ravel()), errors="coerce")
    if (v > 0).any():
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log", nonpositive="clip")
        ax_ = ax.yaxis if axis == "y" else ax.xaxis
        ax_.set_minor_formatter(NullFormatter())  # minor labels of a short log axis run into each other
        ax_.set_major_locator(LogLocator(numticks=5))
        return True
    return False


def _label_ends(ax, lines: list[tuple[np.ndarray, np.ndarray, str, object]], fontsize: float = 5.5) -> None:
    """Direct labels: each line's name at its last point, in its colour (instead of a legend)."""
    for x, y, text, color in lines:
        ok = np.isfinite(np.asarray(y, dtype=float))
        if ok.any():
            i = np.flatnonzero(ok)[-1]
            ax.annotate(text, (x[i], y[i]), xytext=(2, 0), textcoords="offset points", fontsize=fontsize,
                        color=color, va="center", annotation_clip=False)


def _layer_lines(ax, sub: pd.DataFrame, y: str, band: tuple[str, str] | None = None, lw: float = 0.8,
                 fontsize: float = 5.5) -> None:
    """One line of ``y`` over steps per layer of one run, coloured thin → wide (viridis, by fan-in), an optional
    ``band`` (low, high columns) around it, and the layer's name at the line's end."""
    order = sub.drop_duplicates("layer").sort_values(["fan_in", "layer"], kind="stable")["layer"].tolist()
    cols = sns.color_palette("viridis", max(2, len(order)))
    ends = []
    for i, layer in enumerate(order):
        s = sub[sub["layer"] == layer].dropna(subset=[y]).sort_values("step")  # quantiles: their cadence's steps
        if band is not None:
            ax.fill_between(s["step"], s[band[0]], s[band[1]], color=cols[i], alpha=0.2, lw=0)
        ax.plot(s["step"], s[y], lw=lw, color=cols[i])
        ends.append((s["step"].to_numpy(), s[y].to_numpy(), str(layer).removesuffix(".weight"), cols[i]))
    _label_ends(ax, ends, fontsize)


def _grid(n: int, max_cols: int = MAX_COLS) -> tuple[int, int]:
    ncols = max(1, min(n, max_cols))
    return -(-n // ncols), ncols


def _draw_runs(ax, df: pd.DataFrame, y: str, group: str, x: str = "step") -> None:
    """One line per run of ``df`` (colours repeat only after 10 runs of one panel); a run with few points is drawn
    with markers, so a metric logged once is a visible point."""
    pal = sns.color_palette("colorblind", 10)
    for i, (run, s) in enumerate(df.groupby("run", sort=False)):
        s = s.dropna(subset=[y]).sort_values(x)
        if s.empty:
            continue
        ls = "-" if i < 10 else "--"
        lw = max(0.8, 1.8 - 0.25 * i)  # earlier runs a little wider: runs that coincide (pairs) both stay visible
        ax.plot(s[x], s[y], ls, color=pal[i % 10], lw=lw, marker="o" if len(s) <= 20 else None, ms=3 + lw,
                label=_short(str(run), group))


def _pick_metrics(metrics: list[str], most: int = 3) -> list[str]:
    from .training import HELD_OUT_ACCURACY, TRAIN_ACCURACY

    def first(names) -> list[str]:
        return [m for m in names if m in metrics][:1]

    held, train, loss = first(HELD_OUT_ACCURACY), first(TRAIN_ACCURACY), first(("train_loss", "val_loss", "loss"))
    chosen = (held or train) + loss if most == 2 else held + train + loss
    return (chosen or metrics)[:most]



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
    """Small multiples: one row per run group (the study that made the runs; two groups a row when there are more
    than four), one column per metric (accuracies first, then losses), one line per run with a legend outside."""
    if _empty(curves):
        return None
    groups = list(dict.fromkeys(curves["group"])) if "group" in curves else [""]
    per_row = 1 if len(groups) <= 4 else 2  # many groups: two side by side, with two metrics each
    metrics = _pick_metrics(list(dict.fromkeys(curves["metric"])), 3 if per_row == 1 else 2)
    nrows, ncols = -(-len(groups) // per_row), len(metrics) * per_row
    with _figure(path, ncols=ncols, nrows=nrows, width=PANEL_W * ncols + 1.6 * per_row, height=PANEL_H * nrows,
                 sharex=False) as (fig, axes):
        for i, g in enumerate(groups):
            r, c0 = divmod(i, per_row)
            c0 *= len(metrics)
            sub = curves[curves["group"] == g] if g else curves
            for c, metric in enumerate(metrics):
                ax = axes[r][c0 + c]
                _draw_runs(ax, sub[sub["metric"] == metric], "value", g)
                ax.set_title(f"{g}: {metric}" if g else metric, fontsize=8)
                ax.set_xlabel("step" if r == nrows - 1 else "")
                ax.tick_params(labelsize=7)
                _few_ticks(ax)
            _legend_outside(axes[r][c0 + len(metrics) - 1], 6)
    return path


@instrument
def network_flip_ratio(net: pd.DataFrame, path: Path) -> Path | None:
    """Whole-network π over time, one panel per run group, one line per run, legend outside each panel."""
    if _empty(net):
        return None
    groups = list(dict.fromkeys(net["group"])) if "group" in net else [""]
    nrows, ncols = _grid(len(groups), 3)
    with _figure(path, ncols=ncols, nrows=nrows, width=4.4 * ncols, height=2.1 * nrows, sharey=True) as (fig, axes):
        for ax, g in zip(axes.flat, groups, strict=False):
            _draw_runs(ax, net[net["group"] == g] if g else net, "pi", g)
            ax.set_title(g or "all runs", fontsize=8)
            ax.set_ylabel(PI_LABEL, fontsize=7)
            _few_ticks(ax)
            _legend_outside(ax, 5.5)
    return path


@instrument
def layer_flip_ratio(lay: pd.DataFrame, path: Path) -> Path | None:
    """Every run a small panel; one line per layer, coloured thin → wide (viridis) and labelled at its end."""
    if _empty(lay):
        return None
    runs = list(dict.fromkeys(lay["run"]))
    nrows, ncols = _grid(len(runs))
    with _figure(path, ncols=ncols, nrows=nrows, width=PANEL_W * ncols + 0.6, height=PANEL_H * nrows,
                 sharey=True) as (fig, axes):
        for ax, run in zip(axes.flat, runs, strict=False):
            _layer_lines(ax, lay[lay["run"] == run], "pi")
            ax.set_title(str(run), fontsize=7)
            ax.set_ylabel(PI_LABEL if ax in axes[:, 0] else "", fontsize=7)
            ax.tick_params(labelsize=6)
            _few_ticks(ax)
    return path


@instrument
def inertia_flip_probability(bins: pd.DataFrame, path: Path) -> Path | None:
    """One panel per family; every (run, layer) of the family is one line of P(flip within k steps) by inertia
    decile (log y). Summarises without dropping a run; the per-bin intervals are in tables/inertia_bins.csv."""
    if _empty(bins):
        return None
    fams = sorted(dict.fromkeys(bins["family"]), key=lambda f: (f != "latent", f))
    with _figure(path, ncols=len(fams), width=3.4 * len(fams), height=2.8, sharey=True) as (fig, axes):
        pal = sns.color_palette("colorblind", 10)
        for ax, fam in zip(axes[0], fams, strict=True):
            sub = bins[bins["family"] == fam]
            n_runs = sub["run"].nunique()
            for j, (_run, r) in enumerate(sub.groupby("run", sort=False)):
                for _layer, s in r.groupby("layer", sort=False):
                    s = s.sort_values("bin")
                    ax.plot(s["bin"] + 1, s["p_flip"], lw=0.8, alpha=0.7, color=pal[j % 10], marker="o", ms=1.5)
            _log_if_positive(ax, sub["p_flip"])
            ax.set_title(f"{fam}: {n_runs} run(s), {len(sub.groupby(['run', 'layer']))} layer lines", fontsize=8)
            ax.set_xlabel("inertia decile (1 = smallest)")
            k = sorted({int(v) for v in sub["k"].dropna()})
            ax.set_ylabel("P(flip within k steps)" + (f", k = {k[0]}" if len(k) == 1 else ""), fontsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
    return path


@instrument
def schedule_scatter(table: pd.DataFrame, path: Path) -> Path | None:
    if _empty(table):
        return None
    with _figure(path, width=6.0, height=3.0) as (fig, axes):
        ax = axes[0][0]
        sns.scatterplot(data=table, x="value", y="pi", hue="run", style="param", ax=ax, s=14)
        if (table["value"] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel("lr / γ in force")
        ax.set_ylabel(PI_LABEL)
        ax.set_title("Flip ratio against the schedule (20 windows per run)", fontsize=9)
        _few_ticks(ax)
        _legend_outside(ax)
    return path


@instrument
def family_distributions(flip_ratio: pd.DataFrame, inertia: pd.DataFrame, path: Path) -> Path | None:
    """Left: π per step by family. Then one panel per family: the tracked weights' inertia per layer (log x)."""
    if _empty(flip_ratio) and _empty(inertia):
        return None
    fams = sorted(set(flip_ratio.get("family", [])) | set(inertia.get("family", [])))
    ncols = 1 + max(1, len(fams))
    with _figure(path, ncols=ncols, width=3.3 * ncols + 0.8, height=2.8) as (fig, axes):
        ax = axes[0][0]
        if not _empty(flip_ratio):
            sns.boxplot(data=flip_ratio, x="family", y="pi", hue="family", ax=ax, legend=False, fliersize=1)
        ax.set_ylabel(PI_LABEL, fontsize=7)
        ax.set_title("flip ratio per step", fontsize=8)
        for ax, fam in zip(axes[0][1:], fams, strict=False):
            sub = inertia[inertia["family"] == fam] if not _empty(inertia) else inertia
            if _empty(sub):
                ax.set_axis_off()
                continue
            v = sub["inertia"].astype(float)
            pos = sub[v > 0]
            dropped = len(sub) - len(pos)
            sns.histplot(data=pos, x="inertia", hue="layer", ax=ax, element="step", fill=False, log_scale=True,
                         stat="density", common_norm=False, legend=True)
            ax.set_title(f"inertia, {fam}" + (" (τ − w·m)" if fam != "latent" else " (|w̃|)")
                         + (f"; {dropped} values ≤ 0 not on the log axis" if dropped else ""), fontsize=8)
            ax.xaxis.set_major_locator(LogLocator(numticks=4))
            if ax.get_legend() is not None:
                sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1), fontsize=6, title_fontsize=6,
                                frameon=False)
    return path


@instrument
def quantile_ranges(table: pd.DataFrame, path: Path, prefix: str, title: str, xlabel: str) -> Path | None:
    """Per run a panel (every run shown); in it, per layer (ordered by fan-in), the q05–q95 and q25–q75 ranges
    and the median of ``{prefix}_qXX`` on a log axis."""
    cols = [f"{prefix}_{q}" for q in ("q05", "q25", "q50", "q75", "q95")]
    if _empty(table) or not set(cols) <= set(table.columns):
        return None
    t = table.dropna(subset=cols)
    if t.empty:
        return None
    runs = list(dict.fromkeys(t.sort_values(["run"], kind="stable")["run"]))
    fam = prefix.startswith("abs_m")  # |m| and |m|/τ exist for the Bop families only, |w̃| for latent runs only
    absent = [r for r in dict.fromkeys(table["run"]) if r not in runs and
              (("family" not in table) or (table.loc[table["run"] == r, "family"].iloc[0] != "latent") == fam)]
    n_layers = int(t.groupby("run")["layer"].nunique().max())
    nrows, ncols = _grid(len(runs))
    ph = max(1.2, 0.22 * n_layers + 0.7)
    with _figure(path, ncols=ncols, nrows=nrows, width=PANEL_W * ncols, height=ph * nrows) as (fig, axes):
        for ax, run in zip(axes.flat, runs, strict=False):
            r = t[t["run"] == run].sort_values(["fan_in", "layer"], kind="stable")
            y = np.arange(len(r))
            ax.hlines(y, r[cols[0]], r[cols[4]], color="0.6", lw=1)
            ax.hlines(y, r[cols[1]], r[cols[3]], color=sns.color_palette()[0], lw=4)
            ax.plot(r[cols[2]], y, "k|", ms=8)
            _log_if_positive(ax, r[cols].to_numpy().ravel(), "x")
            if prefix.endswith("_rel"):
                ax.axvline(1.0, color="crimson", ls="--", lw=1)
            ax.set_yticks(y)
            ax.set_yticklabels([f"{str(lay).removesuffix('.weight')} ({int(f)})" if pd.notna(f) else str(lay)
                                for lay, f in zip(r["layer"], r["fan_in"], strict=True)], fontsize=6)
            ax.set_ylim(len(r) - 0.5, -0.5)
            ax.set_title(str(run), fontsize=7)
            ax.tick_params(axis="x", labelsize=6)
            if ax.get_xscale() == "log":
                ax.xaxis.set_major_locator(LogLocator(numticks=4))
        fig.suptitle(f"{title}: {xlabel}" + ("; dashed: the threshold (|m| = τ)" if prefix.endswith("_rel") else "")
                     + "; layer (fan-in), thin at the top"
                     + (f"\nnot drawn, no finite values (e.g. τ = 0): {', '.join(absent)}" if absent else ""),
                     fontsize=9)
    return path


@instrument
def never_chatter(table: pd.DataFrame, path: Path) -> Path | None:
    """Per run a panel: per layer the share of weights that never flipped and that chattered."""
    if _empty(table) or table[["never_flipped", "chattering"]].isna().all().all():
        return None
    t = table.dropna(subset=["never_flipped", "chattering"], how="all")
    runs = list(dict.fromkeys(t["run"]))
    n_layers = int(t.groupby("run")["layer"].nunique().max())
    nrows, ncols = _grid(len(runs))
    ph = max(1.2, 0.25 * n_layers + 0.7)
    pal = sns.color_palette("colorblind", 2)
    with _figure(path, ncols=ncols, nrows=nrows, width=PANEL_W * ncols, height=ph * nrows, sharex=True) as (fig,
                                                                                                            axes):
        for ax, run in zip(axes.flat, runs, strict=False):
            r = t[t["run"] == run].sort_values(["fan_in", "layer"], kind="stable")
            y = np.arange(len(r))
            ax.barh(y - 0.2, r["never_flipped"].fillna(0), height=0.4, color=pal[0], label="never flipped")
            ax.barh(y + 0.2, r["chattering"].fillna(0), height=0.4, color=pal[1], label="chatter")
            ax.set_yticks(y)
            ax.set_yticklabels([str(lay).removesuffix(".weight") for lay in r["layer"]], fontsize=6)
            ax.set_ylim(len(r) - 0.5, -0.5)
            ax.set_xlim(0, 1)
            ax.set_title(str(run), fontsize=7)
            ax.tick_params(axis="x", labelsize=6)
        h, lab = axes.flat[0].get_legend_handles_labels()
        fig.legend(h, lab, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=7, frameon=False)
        fig.suptitle("share of each layer's weights (layers thin → wide)", fontsize=9, y=1.03)
    return path


def _family_axes(family: str) -> str:
    return "m̂ (Bop2ndOrder: m/√v)" if family == "bop2nd" else "|m|"


@instrument
def fan_in_law(points: pd.DataFrame, fit: pd.DataFrame, path: Path) -> Path | None:
    """One row per family (Bop's |m| and Bop2ndOrder's normalised m̂ never share an axis): median |m| and flip
    ratio against fan-in, log–log, one colour per run (legend outside), fitted lines and the −0.5 reference."""
    if _empty(points):
        return None
    fams = list(dict.fromkeys(points["family"])) if "family" in points else ["bop"]
    with _figure(path, ncols=2, nrows=len(fams), width=8.6, height=2.8 * len(fams)) as (fig, axes):
        for r, fam in enumerate(fams):
            pf = points[points["family"] == fam] if "family" in points else points
            runs = list(dict.fromkeys(pf["run"]))
            pal = dict(zip(runs, sns.color_palette("husl" if len(runs) > 10 else "colorblind", max(1, len(runs))),
                           strict=False))
            for c, (col, q, lab) in enumerate((("abs_m_q50", "median |m|", f"median {_family_axes(fam)}"),
                                               ("flip_ratio", "flip ratio", "flip ratio + e⁻⁹"))):
                ax = axes[r][c]
                y = pf[col] + (math.exp(-9) if col == "flip_ratio" else 0)
                for run in runs:
                    m = pf["run"] == run
                    ax.scatter(pf.loc[m, "fan_in"], y[m], s=12, color=pal[run], label=run)
                if not _empty(fit):
                    ff = fit[fit["family"] == fam] if "family" in fit else fit
                    for _key, s in ff[ff["quantity"] == q].groupby("run"):
                        ax.plot(s["fan_in"], s["fitted"], lw=0.8, color="0.4")
                    ref = ff[ff["quantity"] == q + " (-0.5 reference)"]
                    if len(ref):
                        ax.plot(ref["fan_in"], ref["fitted"], ls="--", color="crimson", lw=1, label="slope −0.5")
                ax.set_xscale("log")
                _log_if_positive(ax, y)
                ax.set_xlabel("fan-in")
                ax.set_ylabel(lab, fontsize=8)
                ax.set_title(f"{fam}: {q}", fontsize=8)
            _legend_outside(axes[r][1], 5.5)
    return path


@instrument
def thresholds(rec: pd.DataFrame, path: Path) -> Path | None:
    """Recommended (dots) and current (crosses) τ against fan-in, one panel per family (log–log)."""
    if _empty(rec) or rec["recommended_threshold"].isna().all():
        return None
    r = rec.dropna(subset=["recommended_threshold"])
    fams = list(dict.fromkeys(r["family"])) if "family" in r else [""]
    with _figure(path, ncols=len(fams), width=4.6 * len(fams) + 1.0, height=2.9) as (fig, axes):
        for ax, fam in zip(axes[0], fams, strict=True):
            sub = r[r["family"] == fam] if fam else r
            runs = list(dict.fromkeys(sub["run"]))
            pal = sns.color_palette("husl" if len(runs) > 10 else "colorblind", max(1, len(runs)))
            for i, run in enumerate(runs):
                s = sub[sub["run"] == run]
                ax.scatter(s["fan_in"], s["recommended_threshold"], s=14, color=pal[i], label=run)
                ax.scatter(s["fan_in"], s["threshold"], s=14, marker="x", color=pal[i])
            zero = int((pd.to_numeric(sub["recommended_threshold"], errors="coerce") <= 0).sum())
            ax.set_xscale("log")
            _log_if_positive(ax, pd.concat([sub["recommended_threshold"], sub["threshold"]]))
            ax.set_xlabel("fan-in")
            ax.set_ylabel("τ (dots: recommended, ×: current)", fontsize=7)
            ax.set_title(f"{fam or 'all'}" + (f"; {zero} recommended τ = 0 not on the log axis" if zero else ""),
                         fontsize=8)
            _legend_outside(ax, 5.5)
    return path


@instrument
def accuracy_vs_hyperparameters(runs: pd.DataFrame, path: Path) -> Path | None:
    """Final held-out accuracy of the Bop-family runs against γ and against τ (categorical axes: the values the
    runs used, sorted; Bop2ndOrder's τ and a per-layer τ range are categories of their own). One colour per run
    group."""
    if _empty(runs) or "final_val_accuracy" not in runs:
        return None
    t = runs[runs["optimizer"].astype(str).str.startswith("bop") & runs["final_val_accuracy"].notna()].copy()
    if len(t) < 2:  # nothing to compare
        return None
    t["group"] = t["tag"].where(t["tag"].astype(str) != "", t["optimizer"])
    with _figure(path, ncols=2, width=8.6, height=2.8, sharey=True) as (fig, axes):
        for ax, col, lab in ((axes[0][0], "gamma", "γ"), (axes[0][1], "threshold", "τ (a range: per-layer τ)")):
            def cat(v, opt, col=col):  # τ of Bop2ndOrder is on the m̂ scale: its own category, never mixed with Bop's
                tail = " (bop2nd)" if col == "threshold" and opt == "bop2nd" else ""
                with contextlib.suppress(TypeError, ValueError):
                    v = float(v)  # numbers read back from a CSV are text
                if isinstance(v, float) and not math.isnan(v):
                    return (int(bool(tail)), float(v), f"{float(v):.2g}{tail}")
                return (2, math.inf, str(v))

            vals = pd.Series([cat(v, o) for v, o in zip(t[col], t["optimizer"], strict=True)], index=t.index)
            cats = sorted(set(vals))
            x = vals.map({c: i for i, c in enumerate(cats)})
            for i, g in enumerate(dict.fromkeys(t["group"])):
                m = t["group"] == g
                jitter = (i - 1) * 0.08
                ax.scatter(x[m] + jitter, t.loc[m, "final_val_accuracy"], s=16, label=str(g),
                           color=sns.color_palette("colorblind", 10)[i % 10])
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels([c[2] for c in cats], rotation=30, ha="right", fontsize=6)
            ax.set_xlabel(lab)
            metric = ", ".join(sorted({str(m) for m in t.get("accuracy_metric", []) if m})) or "accuracy"
            ax.set_ylabel(f"final {metric}", fontsize=7)
        _legend_outside(axes[0][1])
    return path


@instrument
def thresholds_over_time(taus: pd.DataFrame, path: Path) -> Path | None:
    """τ_l(t) of runs whose per-layer thresholds change during training (the calibrated policy's controller),
    one panel per run, one line per layer labelled at its end, log y."""
    if _empty(taus):
        return None
    runs = list(dict.fromkeys(taus["run"]))
    nrows, ncols = _grid(len(runs), 3)
    with _figure(path, ncols=ncols, nrows=nrows, width=3.8 * ncols, height=2.3 * nrows) as (fig, axes):
        for ax, run in zip(axes.flat, runs, strict=False):
            sub = taus[taus["run"] == run]
            _layer_lines(ax, sub, "threshold", lw=1, fontsize=6)
            _log_if_positive(ax, sub["threshold"])
            ax.set_title(str(run), fontsize=8)
            ax.set_xlabel("step")
            ax.set_ylabel("τ_l", fontsize=7)
            _few_ticks(ax)
    return path


@instrument
def latent_inertia(lat: pd.DataFrame, path: Path) -> Path | None:
    """Latent-weight magnitude |w̃| (inertia) over time: one panel per latent run, per layer the median and the
    q25–q75 band, log y; layers labelled at their ends."""
    if _empty(lat):
        return None
    runs = list(dict.fromkeys(lat["run"]))
    nrows, ncols = _grid(len(runs))
    with _figure(path, ncols=ncols, nrows=nrows, width=PANEL_W * ncols + 0.6, height=2.1 * nrows) as (fig, axes):
        for ax, run in zip(axes.flat, runs, strict=False):
            sub = lat[lat["run"] == run]
            _layer_lines(ax, sub, "abs_w_q50", band=("abs_w_q25", "abs_w_q75"), lw=1)
            _log_if_positive(ax, sub[["abs_w_q25", "abs_w_q50", "abs_w_q75"]].to_numpy().ravel())
            ax.set_title(str(run), fontsize=7)
            ax.set_ylabel("|w̃| (median, q25–q75)" if ax in axes[:, 0] else "", fontsize=7)
            ax.tick_params(labelsize=6)
            _few_ticks(ax)
    return path


@instrument
def width_sweep(points: pd.DataFrame, path: Path) -> Path | None:
    """The controlled width sweep: for the layer after the varied width W, median |m| and flip ratio against W
    (log–log), one line per (dataset, seed)."""
    if _empty(points):
        return None
    with _figure(path, ncols=2, width=7.8, height=2.7) as (fig, axes):
        for ax, (col, lab) in zip(axes[0], (("abs_m_q50", "median |m| of the layer after W"),
                                            ("flip_ratio", "flip ratio + e⁻⁹")), strict=True):
            for i, ((ds, seed), s) in enumerate(points.groupby(["dataset", "seed"], sort=True)):
                s = s.sort_values("fan_in")
                y = s[col] + (math.exp(-9) if col == "flip_ratio" else 0)
                ax.plot(s["fan_in"], y, "o-", ms=3, lw=1, color=sns.color_palette("colorblind", 10)[i % 10],
                        label=f"{ds}, seed {seed}")
            ax.set_xscale("log", base=2)
            _log_if_positive(ax, points[col])
            ax.set_xlabel("hidden width W (fan-in of the layer after it)")
            ax.set_ylabel(lab, fontsize=7)
        _legend_outside(axes[0][1])
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
        _few_ticks(ax)
        _legend_outside(ax)
    return path
