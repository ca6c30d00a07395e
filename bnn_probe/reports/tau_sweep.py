"""Report part: the one-layer τ sweep — do wide layers need a smaller Bop threshold? (asked directly).

Bop (Helwegen et al. 2019) flips w when w·m > τ. In a network of mixed widths, the runs of the sweep scale ONE layer's
τ by a factor f (τ_l = f·τ, every other layer at the shared τ; ``--threshold-policy one-layer``), f on a grid such as
{1/10, 1/3, 1, 3, 10}; f = 1 is the shared base run. For every layer and seed (the seed is the unit of
replication; a seed's runs share the initial weights and batch order, so differences are paired):

* the final validation loss L(x) at x = log10 f is fitted by a quadratic L = a + b·x + c·x² (least squares over the
  seed's grid; with three points it interpolates). The optimum is x* = −b/(2c) when c > 0 and the vertex lies on the
  grid's range; otherwise (vertex outside, or c ≤ 0) x* is the end of the range with the lower fitted loss and the row
  is flagged ``edge``. τ*_l = τ · 10^{x*};
* per layer: the mean of x* over seeds with a cluster-bootstrap interval (whole seeds resampled, i.e. the seed's
  x*), and the paired differences L(f) − L(1) per factor, mean and t-interval over seeds;
* the dependence on fan-in, with the LAYER as the unit: OLS of the layers' mean log10 τ*_l on log10 fan_in_l
  (an intercept per network when several are pooled), t-interval with df = #layers − #networks − 1. Seeds enter only
  through the per-layer means, so the interval does not count seeds of one layer as evidence about a between-layer
  slope.

Verdict ``thresholds.one_layer_sweep``, claim "wide layers need a smaller threshold" (slope < 0): supported when the
interval lies below 0, not supported when it excludes slopes steeper than −``negligible``, inconclusive otherwise,
and always inconclusive with fewer than 3 seeds or 3 distinct fan-ins (the ``--quick`` grid says "inconclusive
(quick)").

Example (synthetic: every layer's best τ is the shared τ, so the fan-in slope is 0):
    >>> from bnn_probe.reports.tau_sweep import synthetic_sweep, analyse
    >>> res = analyse(synthetic_sweep(lambda fan_in: 0.0, seeds=3))
    >>> res.verdict.verdict, abs(res.slope.slope) < 0.02
    ('not supported', True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import stats
from .frames import config, frame, meta, run_name
from .training import _final

TAG = "thresholds-tau-sweep"
NEGLIGIBLE_SLOPE = 0.1
MIN_SEEDS = 3
MIN_FAN_INS = 3
POINT_COLUMNS = ["network", "seed", "layer", "fan_in", "factor", "x", "val_loss", "val_accuracy", "threshold",
                 "quick", "run"]


def is_tau_sweep(run) -> bool:
    """A run of the one-layer τ sweep (tag ``thresholds-tau-sweep`` or ``thresholds-tau-sweep-quick``)."""
    return str(meta(run).get("tag") or "").startswith(TAG)


def _policy_args(run) -> dict:
    pol = (config(run).get("extra") or {}).get("threshold_policy") or {}
    return pol.get("args", {}) if isinstance(pol, dict) and pol.get("name") == "one-layer" else {}


def _layer(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def sweep_points(runs) -> pd.DataFrame:
    """One row per (run, layer it speaks for): the base run (f = 1) speaks for every layer, a one-layer run for the
    layer whose τ it scales. ``network`` = dataset and model (and widths)."""
    rows = []
    for run in runs:
        if not is_tau_sweep(run):
            continue
        c = config(run)
        lay = frame(run, "layers")
        fan = dict(zip(lay["layer"].map(_layer), lay["fan_in"], strict=True)) if "layer" in lay else {}
        args = _policy_args(run)
        widths = c.get("widths")
        network = f"{c.get('dataset', '')} {c.get('model', '')}" + (f" {list(widths)}" if widths else "")
        train = frame(run, "train")
        common = {"network": network, "seed": c.get("seed"), "val_loss": _final(train, "val_loss"),
                  "val_accuracy": _final(train, "val_accuracy"), "threshold": c.get("threshold"),
                  "quick": str(meta(run).get("tag")).endswith("quick"), "run": run_name(run)}
        if args:
            layer, f = _layer(str(args.get("layer", ""))), float(args.get("factor", math.nan))
            rows.append({**common, "layer": layer, "fan_in": fan.get(layer, math.nan), "factor": f})
        else:
            rows += [{**common, "layer": layer, "fan_in": n, "factor": 1.0} for layer, n in fan.items()]
    df = pd.DataFrame(rows, columns=[c for c in POINT_COLUMNS if c != "x"])
    df.insert(5, "x", np.log10(df["factor"].astype(float)))
    # a base run speaks for every layer, but only layers that some one-layer run varied belong to the sweep
    varied = df[df["factor"] != 1.0].groupby("network")["layer"].agg(set)
    keep = [r.layer in varied.get(r.network, set()) for r in df.itertuples()]
    return df[keep].reset_index(drop=True)


def quadratic_optimum(x, y) -> tuple[float, str]:
    """x* minimising the least-squares quadratic through (x, y) on [min x, max x]; ``edge`` when it is not an
    interior vertex. Needs 3 distinct x (else nan).

    >>> x, flag = quadratic_optimum([-1, 0, 1], [2.0, 1.0, 3.0])   # y = 1 + x/2 + 3x²/2: vertex at −1/6
    >>> round(x, 6), flag
    (-0.166667, '')
    >>> quadratic_optimum([-1, 0, 1], [3.0, 2.0, 1.0])          # falls all the way: the right end
    (1.0, 'edge')
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if np.unique(x).size < 3:
        return math.nan, "fewer than 3 factors"
    c, b, a = np.polyfit(x, y, 2)
    lo, hi = float(x.min()), float(x.max())
    if c > 0:
        v = -b / (2 * c)
        if lo <= v <= hi:
            return float(v), ""
    ends = [(a + b * e + c * e * e, e) for e in (lo, hi)]
    return float(min(ends)[1]), "edge"


@dataclass
class TauSweep:
    points: pd.DataFrame  # POINT_COLUMNS
    per_seed: pd.DataFrame  # network, layer, fan_in, seed, x_star, flag
    layers: pd.DataFrame  # network, layer, fan_in, n_seeds, x_star, x_lo, x_hi, tau_star, tau_lo, tau_hi, edge_share
    paired: pd.DataFrame  # network, layer, fan_in, factor, n_seeds, diff_loss, lo, hi, diff_acc
    slope: stats.Slope
    verdict: stats.Verdict
    fit: pd.DataFrame = field(default_factory=pd.DataFrame)  # fan_in, fitted log10 τ*/τ (the line to draw)


def analyse(points: pd.DataFrame, n_boot: int = 1000, negligible: float = NEGLIGIBLE_SLOPE) -> TauSweep:
    """The analysis of the module docstring on :func:`sweep_points`' table."""
    pts = points.dropna(subset=["val_loss", "x"])
    per_seed = []
    for (net, layer, seed), g in pts.groupby(["network", "layer", "seed"], sort=True):
        xs, flag = quadratic_optimum(g["x"], g["val_loss"])
        per_seed.append({"network": net, "layer": layer, "fan_in": g["fan_in"].iloc[0], "seed": seed, "x_star": xs,
                         "flag": flag})
    per_seed_df = pd.DataFrame(per_seed, columns=["network", "layer", "fan_in", "seed", "x_star", "flag"])
    lay_rows = []
    for (net, layer), g in per_seed_df.groupby(["network", "layer"], sort=False):
        xs = g["x_star"].to_numpy(float)
        xs = xs[np.isfinite(xs)]
        mean = float(xs.mean()) if xs.size else math.nan
        lo, hi = stats.bootstrap_ci(xs, np.mean, n_boot=n_boot)
        tau = float(pts.loc[(pts["network"] == net), "threshold"].iloc[0])
        lay_rows.append({"network": net, "layer": layer, "fan_in": g["fan_in"].iloc[0], "n_seeds": int(xs.size),
                         "x_star": mean, "x_lo": lo, "x_hi": hi, "tau_star": tau * 10 ** mean,
                         "tau_lo": tau * 10 ** lo, "tau_hi": tau * 10 ** hi,
                         "edge_share": float((g["flag"] == "edge").mean())})
    layers = pd.DataFrame(lay_rows, columns=["network", "layer", "fan_in", "n_seeds", "x_star", "x_lo", "x_hi",
                                             "tau_star", "tau_lo", "tau_hi", "edge_share"])
    paired = _paired(pts)
    ok = layers.dropna(subset=["x_star"])
    slope = stats.linear_slope(np.log10(ok["fan_in"].astype(float)), ok["x_star"], ok["network"],
                               method="OLS of the layers' mean log10 τ*_l on log10 fan_in (the layer is the unit, "
                                      "intercept per network), t-interval")
    fit = []
    if math.isfinite(slope.slope):
        for net, a in slope.intercepts.items():
            f = ok.loc[ok["network"] == net, "fan_in"].astype(float)
            fit += [{"network": net, "fan_in": v, "fitted": a + slope.slope * math.log10(v)}
                    for v in (f.min(), f.max())]
    verdict = _verdict(pts, ok, slope, negligible)
    return TauSweep(pts.reset_index(drop=True), per_seed_df, layers, paired, slope, verdict,
                    pd.DataFrame(fit, columns=["network", "fan_in", "fitted"]))


def _paired(pts: pd.DataFrame) -> pd.DataFrame:
    """Per (network, layer, factor ≠ 1): L(f) − L(1) of the same seed, mean and 95 % t-interval over seeds."""
    from .stats import t_interval

    cols = ["network", "layer", "fan_in", "factor", "n_seeds", "diff_loss", "lo", "hi", "diff_acc"]
    base = pts[pts["factor"] == 1.0].set_index(["network", "layer", "seed"])
    rows = []
    for (net, layer, f), g in pts[pts["factor"] != 1.0].groupby(["network", "layer", "factor"], sort=True):
        keys = [(net, layer, s) for s in g["seed"]]
        have = [k in base.index for k in keys]
        g = g[have]
        if g.empty:
            continue
        b = base.loc[[(net, layer, s) for s in g["seed"]]]
        d = g["val_loss"].to_numpy(float) - b["val_loss"].to_numpy(float)
        da = g["val_accuracy"].to_numpy(float) - b["val_accuracy"].to_numpy(float)
        m, lo, hi = t_interval(d)
        rows.append({"network": net, "layer": layer, "fan_in": g["fan_in"].iloc[0], "factor": f, "n_seeds": len(d),
                     "diff_loss": m, "lo": lo, "hi": hi, "diff_acc": float(np.mean(da))})
    return pd.DataFrame(rows, columns=cols)


def _verdict(pts: pd.DataFrame, layers: pd.DataFrame, slope: stats.Slope, negligible: float) -> stats.Verdict:
    claim = "One-layer τ sweep: wide layers need a smaller threshold (the optimal τ_l falls with fan-in)"
    name = "slope of log10 τ*_l on log10 fan_in (layers as units)"
    runs = sorted(set(pts["run"]))
    n_seeds = int(pts["seed"].nunique()) if len(pts) else 0
    n_fan = int(layers["fan_in"].nunique()) if len(layers) else 0
    quick = bool(len(pts)) and bool(pts["quick"].all())
    interval = slope.interval if math.isfinite(slope.slope) else None
    stat = slope.slope if math.isfinite(slope.slope) else None
    if n_seeds < MIN_SEEDS or n_fan < MIN_FAN_INS:
        why = (f"{n_seeds} seed(s) (< {MIN_SEEDS})" if n_seeds < MIN_SEEDS else "") + \
              ("; " if n_seeds < MIN_SEEDS and n_fan < MIN_FAN_INS else "") + \
              (f"{n_fan} distinct fan-in(s) (< {MIN_FAN_INS})" if n_fan < MIN_FAN_INS else "")
        if quick:
            why = f"inconclusive (quick): the quick grid is a smoke test — {why}"
        return stats.Verdict(claim, stats.INCONCLUSIVE, stat, interval, len(runs), runs, name, slope.method, why,
                             "thresholds", id="thresholds.one_layer_sweep")
    v, why = stats.verdict_negative(slope.slope, slope.interval, n_fan, MIN_FAN_INS, negligible)
    why += f" ({len(layers)} layers, {n_seeds} seeds, df {slope.df})"
    return stats.Verdict(claim, v, stat, interval, len(runs), runs, name, slope.method, why, "thresholds",
                         id="thresholds.one_layer_sweep")


def synthetic_sweep(log_tau_star, seeds: int = 3, layers=(("fc1", 64), ("fc2", 2048), ("fc3", 64), ("fc4", 1024),
                                                            ("fc5", 256)),
                    factors=(0.1, 1 / 3, 1.0, 3.0, 10.0), curvature: float = 0.05, noise: float = 0.002,
                    seed: int = 0, quick: bool = False) -> pd.DataFrame:
    """A :func:`sweep_points` table with a known answer: layer l's validation loss is
    0.3 + curvature · (x − log_tau_star(fan_in_l))² + N(0, noise²) per seed, so its optimum is log_tau_star(fan_in)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(seeds):
        for layer, n in layers:
            x0 = float(log_tau_star(n))
            for f in factors:
                x = math.log10(f)
                loss = 0.3 + curvature * (x - x0) ** 2 + rng.normal(0, noise)
                rows.append({"network": "synthetic", "seed": s, "layer": layer, "fan_in": n, "factor": f, "x": x,
                             "val_loss": loss, "val_accuracy": 1 - loss, "threshold": 1e-6, "quick": quick,
                             "run": f"{layer}-x{f:.3g}-s{s}"})
    return pd.DataFrame(rows, columns=POINT_COLUMNS)


def figure(res: TauSweep, path):
    """figures/tau_sweep.png: paired validation-loss differences against the factor per layer, and the optimal
    τ_l against fan-in with the layer-level fit. Draws the prepared tables; computes nothing."""
    from . import figures as F

    @F.instrument
    def draw(paired: pd.DataFrame, layers: pd.DataFrame, fit: pd.DataFrame, path):
        if F._empty(paired) and F._empty(layers):
            return None
        with F._figure(path, ncols=2, width=9.5, height=3.6) as (fig, axes):
            ax = axes[0][0]
            for (_net, layer), g in paired.groupby(["network", "layer"], sort=False):
                g = g.sort_values("factor")
                label = f"{layer} (fan-in {int(g['fan_in'].iloc[0])})"
                ax.errorbar(g["factor"], g["diff_loss"], yerr=[g["diff_loss"] - g["lo"], g["hi"] - g["diff_loss"]],
                            marker="o", capsize=2, label=label)
            ax.axhline(0, color="0.5", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel("factor f on one layer's τ (others at τ)")
            ax.set_ylabel("val. loss − val. loss at f = 1")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
            ax = axes[0][1]
            if not F._empty(layers):
                ax.errorbar(layers["fan_in"], layers["x_star"],
                            yerr=[layers["x_star"] - layers["x_lo"], layers["x_hi"] - layers["x_star"]],
                            fmt="o", capsize=2)
                for _, r in layers.iterrows():
                    ax.annotate(str(r["layer"]), (r["fan_in"], r["x_star"]), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
            for _, g in fit.groupby("network"):
                ax.plot(g["fan_in"], g["fitted"], color="0.3", lw=1)
            ax.axhline(0, color="0.5", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("fan-in")
            ax.set_ylabel("log10(τ*_l / τ)")
        return path

    return draw(res.paired, res.layers, res.fit, path)


def section(runs, w, opt):
    """The report section (``render.Section``) and its verdict, or ``(None, [])`` without sweep runs."""
    from .render import Section

    points = sweep_points(list(runs))
    if points.empty:
        return None, []
    res = analyse(points, n_boot=getattr(opt, "n_boot", 1000))
    sec = Section("3c. The one-layer τ sweep: the optimal threshold per layer", anchor="tau-sweep")
    sec.text("The direct answer to \"do wide layers need a smaller threshold?\": in a network of mixed widths, one "
             "layer's τ at a time is scaled by a factor f (all other layers keep the shared τ), and the final "
             "validation loss is compared with the base run (f = 1) of the same seed. Per layer and seed, a quadratic "
             "in log10 f through the validation losses gives the optimal factor (flagged 'edge' when the minimum is "
             "at the end of the grid); per layer, its mean over seeds with a bootstrap interval over seeds. The "
             "fan-in dependence is fitted with the layer as the unit: one point per layer (its mean over seeds), so "
             "the degrees of freedom count layers, not seeds.")
    sec.verdicts([res.verdict])
    sec.figure(figure(res, w.fig("tau_sweep")),
               "Left: validation loss relative to f = 1, per varied layer (mean and 95 % t-interval over seeds). "
               "Right: optimal log10(τ_l/τ) per layer against fan-in, bootstrap interval over seeds, layer-level fit")
    sec.table(res.layers, "Optimal τ per layer", w.csv("tau_sweep_layers", res.layers))
    sec.table(res.paired, "Paired differences against the base run (same seed)", w.csv("tau_sweep_paired",
                                                                                       res.paired))
    w.csv("tau_sweep_points", res.points)
    w.csv("tau_sweep_per_seed", res.per_seed)
    return sec, [res.verdict]
