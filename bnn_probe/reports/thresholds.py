"""Section 3 of a report: per-layer threshold needs (does one global Bop τ serve wide and thin layers?).

* :func:`layer_table` — per (run, layer): fan-in, flip ratio over the analysed window, |m| (Bop) or |w̃| (latent)
  quantiles, the threshold in force, the share of weights that never flipped and of weights that chatter.
* :func:`fan_in_law` — slopes of log(median |m|) and of log(flip ratio) against log(fan_in), with t-intervals from
  the regression standard error (intercept per run), set against the batch-norm prediction −0.5; verdicts.
* :func:`recommended_thresholds` — per layer the τ that would give it the target flip ratio.

Method of the recommendation ("tail matching", documented in docs/reports.md): a weight flips when w·m > τ. Write
P(w·m > τ) = c_l · G_l(τ), with G_l(x) = P(|m| > x) the layer's |m| tail (from the recorded quantiles
abs_m_q05…q95, medians over the window; log-linear interpolation between them, linear from (0, 1) to q05, power-law
extrapolation beyond q95) and c_l the share of weights above threshold whose momentum points along the weight (w·m > 0,
the side that flips). c_l is estimated from the observed flip ratio, c_l = flip_ratio_l / G_l(τ_l), and assumed
not to depend on τ; the recommended τ*_l solves c_l · G_l(τ*_l) = target. ``bound`` says when τ* lies outside the
recorded quantiles (extrapolated) or cannot be reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import stats
from .frames import BOP_FAMILIES, QUANTILE_P, QUANTILES, analysis_window, concat, family, frame, pi_metric, run_name

CHATTER_MIN_FLIPS = 10
METHOD = (
    "Tail matching: a weight flips when w·m > τ. With G_l(x) = P(|m| > x), the layer's |m| tail interpolated "
    "log-linearly through the recorded quantiles abs_m_q05…q95 (medians over the analysed window; linear from "
    "(0, 1) to q05; power-law extrapolation beyond q95), write P(w·m > τ) = c_l · G_l(τ), where c_l, the share of "
    "above-threshold weights whose momentum points along the weight, is estimated from the observed flip ratio "
    "(c_l = flip_ratio_l / G_l(τ_l)) and assumed not to depend on τ. The recommended τ*_l solves "
    "c_l · G_l(τ*_l) = target. Column 'bound' flags extrapolated or unreachable values."
)
PREDICTION = -0.5


def _chatter(wf: pd.DataFrame, chatter_min: int) -> pd.DataFrame:
    cols = ["layer", "never_flipped", "chattering"]
    if wf.empty or not {"step", "layer", "flips_per_weight", "n"} <= set(wf.columns):
        return pd.DataFrame(columns=cols)
    last = wf.groupby("layer")["step"].transform("max")
    w = wf[wf["step"] == last]
    tot = w.groupby("layer")["n"].sum()
    never = w[w["flips_per_weight"] == 0].groupby("layer")["n"].sum()
    chat = w[w["flips_per_weight"] >= chatter_min].groupby("layer")["n"].sum()
    out = pd.DataFrame({"never_flipped": never.reindex(tot.index, fill_value=0) / tot,
                        "chattering": chat.reindex(tot.index, fill_value=0) / tot})
    return out.reset_index()


def layer_table(runs, window: float = 0.5, chatter_min: int = CHATTER_MIN_FLIPS) -> pd.DataFrame:
    """Per (run, layer) summary over the last ``window`` fraction of each run's steps."""
    out = []
    for run in runs:
        steps = frame(run, "steps")
        layers = frame(run, "layers")
        if steps.empty:
            continue
        win = analysis_window(steps, window)
        cols = {"flip_ratio": ("flip_ratio", "mean"), "n_steps": ("step", "nunique")}
        for q in QUANTILES:
            for pre in ("abs_m", "abs_w"):
                if f"{pre}_{q}" in win:
                    cols[f"{pre}_{q}"] = (f"{pre}_{q}", "median")
        if "threshold" in win:
            cols["threshold"] = ("threshold", "median")
        g = win.groupby("layer").agg(**cols).reset_index()
        if not layers.empty:
            keep = [c for c in ("layer", "fan_in", "fan_out", "n_weights") if c in layers]
            g = g.merge(layers[keep], on="layer", how="left")
            if "threshold" not in g and "threshold" in layers:
                g = g.merge(layers[["layer", "threshold"]], on="layer", how="left")
        g = g.merge(_chatter(frame(run, "weight_flips"), chatter_min), on="layer", how="left")
        g["pi"] = pi_metric(g["flip_ratio"])
        if "threshold" in g and f"abs_m_{QUANTILES[0]}" in g:
            tau = g["threshold"].where(g["threshold"] > 0)
            for q in QUANTILES:
                g[f"abs_m_rel_{q}"] = g[f"abs_m_{q}"] / tau
        g.insert(0, "family", family(run))
        g.insert(0, "run", run_name(run))
        out.append(g)
    df = concat(out, ["run", "family", "layer", "flip_ratio", "n_steps", "fan_in", "n_weights", "pi"])
    for c in ("fan_in", "fan_out", "n_weights", "threshold", "never_flipped", "chattering"):
        if c not in df:
            df[c] = np.nan
    return df.sort_values(["run", "fan_in", "layer"], kind="stable").reset_index(drop=True)


@dataclass
class FanInLaw:
    points: pd.DataFrame  # run, family, layer, fan_in, abs_m_q50, flip_ratio
    slopes: pd.DataFrame  # family, quantity, slope, ci_lo, ci_hi, n, df, n_fan_in, method
    verdicts: list[stats.Verdict] = field(default_factory=list)
    fit: pd.DataFrame = field(default_factory=pd.DataFrame)  # family, run, quantity, fan_in, fitted (lines to draw)


def _fit_lines(fam: str, sub: pd.DataFrame, quantity: str, s: stats.Slope) -> list[dict]:
    rows = []
    if not math.isfinite(s.slope):
        return rows
    for run, a in s.intercepts.items():
        f = sub.loc[sub["run"] == run, "fan_in"].astype(float)
        if f.empty:
            continue
        for x in (f.min(), f.max()):
            rows.append({"family": fam, "run": run, "quantity": quantity, "fan_in": x,
                         "fitted": math.exp(a + s.slope * math.log(x))})
    if quantity == "median |m|" and rows:
        lm = np.log(sub["abs_m_q50"].astype(float))
        lf = np.log(sub["fan_in"].astype(float))
        ok = np.isfinite(lm) & np.isfinite(lf)
        if ok.any():
            a = float(lm[ok].mean() - PREDICTION * lf[ok].mean())
            for x in (float(np.exp(lf[ok].min())), float(np.exp(lf[ok].max()))):
                rows.append({"family": fam, "run": "", "quantity": quantity + " (-0.5 reference)", "fan_in": x,
                             "fitted": math.exp(a + PREDICTION * math.log(x))})
    return rows


def prediction_verdict(interval, too_little: str = "", max_halfwidth: float = 0.25) -> tuple[str, str]:
    """Verdict on "the slope equals the batch-norm prediction −0.5": supported when the interval contains −0.5 and
    is narrower than ±max_halfwidth, not supported when it excludes −0.5, inconclusive otherwise (or when
    ``too_little`` names why the data cannot decide)."""
    lo, hi = (math.nan, math.nan) if interval is None else interval
    if too_little or not (math.isfinite(lo) and math.isfinite(hi)):
        return stats.INCONCLUSIVE, too_little or "no slope estimate"
    if not (lo <= PREDICTION <= hi):
        return stats.NOT_SUPPORTED, "the interval excludes -0.5"
    if (hi - lo) / 2 <= max_halfwidth:
        return stats.SUPPORTED, f"the interval contains -0.5 and is narrower than ±{max_halfwidth}"
    return stats.INCONCLUSIVE, f"the interval contains -0.5 but is wider than ±{max_halfwidth}"


def fan_in_law(table: pd.DataFrame, min_fan_ins: int = 3, negligible: float = 0.1,
               max_halfwidth: float = 0.25) -> FanInLaw:
    """Fan-in law per Bop family from :func:`layer_table`'s rows."""
    pts = table[table["family"].isin(BOP_FAMILIES)]
    # "under one threshold": only runs whose layers share one τ (or whose τ is unknown) enter the flip-ratio slope
    if "threshold" in pts:
        per_layer_tau = pts.groupby("run")["threshold"].transform(lambda t: t.dropna().nunique() > 1)
    else:
        per_layer_tau = pd.Series(False, index=pts.index)
    cols = ["run", "family", "layer", "fan_in", "abs_m_q50", "flip_ratio"]
    pts = pts[[c for c in cols if c in pts]].copy()
    if "abs_m_q50" not in pts:
        pts["abs_m_q50"] = np.nan
    slopes, verdicts, fit = [], [], []
    for fam, sub in pts.groupby("family", sort=True):
        label = "Bop2ndOrder, normalised m̂" if fam == "bop2nd" else "Bop"
        runs = sorted(set(sub["run"]))
        n_fan = int(sub["fan_in"].nunique())
        s_m = stats.loglog_slope(sub["fan_in"], sub["abs_m_q50"], sub["run"])
        one_tau = sub[~per_layer_tau.loc[sub.index].to_numpy(dtype=bool)]
        s_f = stats.loglog_slope(one_tau["fan_in"], one_tau["flip_ratio"] + math.exp(-9), one_tau["run"])
        n_fan_f = int(one_tau["fan_in"].nunique())
        for q, s in (("median |m|", s_m), ("flip ratio", s_f)):
            fit += _fit_lines(fam, sub, q, s)
            slopes.append({"family": fam, "quantity": q, "slope": s.slope, "ci_lo": s.interval[0],
                           "ci_hi": s.interval[1], "n": s.n, "df": s.df, "n_fan_in": n_fan, "method": s.method})
        few = n_fan < min_fan_ins
        why_few = f"only {n_fan} distinct fan-in values (< {min_fan_ins})"

        v, why = stats.verdict_negative(s_m.slope, s_m.interval, n_fan, min_fan_ins, negligible)
        verdicts.append(stats.Verdict(
            f"Wide layers need a smaller threshold than thin layers ({label}): log median |m| falls with log fan_in",
            v, s_m.slope, s_m.interval, s_m.n, runs, "slope of log median |m| vs log fan_in", s_m.method,
            why_few if few else why, "thresholds"))

        v, why = prediction_verdict(s_m.interval, why_few if few else "", max_halfwidth)
        verdicts.append(stats.Verdict(
            f"|m| scales like fan_in^-0.5, the batch-norm prediction ({label})", v, s_m.slope, s_m.interval, s_m.n,
            runs, "slope of log median |m| vs log fan_in", s_m.method, why, "thresholds"))

        v, why = stats.verdict_negative(s_f.slope, s_f.interval, n_fan_f, min_fan_ins, negligible)
        if one_tau.empty:
            why = "no run with one threshold for all its layers"
        elif n_fan_f < min_fan_ins:
            why = f"only {n_fan_f} distinct fan-in values among runs with one threshold (< {min_fan_ins})"
        verdicts.append(stats.Verdict(
            f"Under one threshold, wide layers flip less than thin layers ({label})", v, s_f.slope, s_f.interval,
            s_f.n, sorted(set(one_tau["run"])), "slope of log(flip ratio + e^-9) vs log fan_in", s_f.method, why,
            "thresholds"))
    if pts.empty:
        verdicts.append(stats.Verdict(
            "Wide layers need a smaller threshold than thin layers", stats.INCONCLUSIVE, None, None, 0, [],
            "slope of log median |m| vs log fan_in", "", "no Bop runs with per-layer |m| in the logs", "thresholds"))
    sl = pd.DataFrame(slopes, columns=["family", "quantity", "slope", "ci_lo", "ci_hi", "n", "df", "n_fan_in",
                                       "method"])
    fit_df = pd.DataFrame(fit, columns=["family", "run", "quantity", "fan_in", "fitted"])
    return FanInLaw(pts.reset_index(drop=True), sl, verdicts, fit_df)


def _tail_knots(qrow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knots (x, G(x)) of the |m| tail function from quantiles q05..q95 (monotone, positive x)."""
    x = np.maximum.accumulate(np.asarray(qrow, dtype=float))
    g = 1 - np.asarray(QUANTILE_P)
    return x, g


def tail_prob(x: float, q: np.ndarray) -> tuple[float, str]:
    """G(x) = P(|m| > x) from the quantiles q05..q95; returns (G, bound flag)."""
    kx, kg = _tail_knots(q)
    if x <= 0:
        return 1.0, ""
    if x <= kx[0]:
        return 1 - (1 - kg[0]) * x / kx[0] if kx[0] > 0 else kg[0], ""
    if x > kx[-1]:
        if kx[-1] <= 0:  # every recorded quantile of |m| is 0: no weight moves
            return 0.0, "all |m| quantiles are 0"
        a = _tail_exponent(kx, kg)
        return float(kg[-1] * (x / kx[-1]) ** (-a)), "extrapolated"
    i = int(np.searchsorted(kx, x, side="right")) - 1
    i = min(max(i, 0), len(kx) - 2)
    if kx[i + 1] <= kx[i]:
        return float(kg[i + 1]), ""
    if kx[i] <= 0:  # segment starting at |m| = 0 (weights with zero gradient): linear in x, no log of 0
        return float(kg[i] + (kg[i + 1] - kg[i]) * x / kx[i + 1]), ""
    t = (math.log(x) - math.log(kx[i])) / (math.log(kx[i + 1]) - math.log(kx[i]))
    return float(math.exp(math.log(kg[i]) + t * (math.log(kg[i + 1]) - math.log(kg[i])))), ""


def _tail_exponent(kx, kg) -> float:
    if kx[-2] > 0 and kx[-1] > kx[-2]:
        return max(0.5, (math.log(kg[-2]) - math.log(kg[-1])) / (math.log(kx[-1]) - math.log(kx[-2])))
    return 4.0


def tail_inverse(gt: float, q: np.ndarray) -> tuple[float, str]:
    """x with P(|m| > x) = gt; the inverse of :func:`tail_prob`."""
    kx, kg = _tail_knots(q)
    if gt >= 1:
        return math.nan, "unreachable by the threshold alone (needs more flips than τ=0 gives)"
    if gt <= 0:
        return math.inf, "unreachable"
    if gt >= kg[0]:
        return float(kx[0] * (1 - gt) / (1 - kg[0])), ""
    if gt < kg[-1]:
        a = _tail_exponent(kx, kg)
        return float(kx[-1] * (gt / kg[-1]) ** (-1 / a)), "extrapolated beyond q95"
    # kg decreasing: find segment with kg[i] >= gt >= kg[i+1]
    i = int(np.searchsorted(-kg, -gt, side="right")) - 1
    i = min(max(i, 0), len(kg) - 2)
    if kx[i + 1] <= kx[i]:
        return float(kx[i + 1]), ""
    if kx[i] <= 0:  # the linear segment of tail_prob that starts at |m| = 0
        return float(kx[i + 1] * (kg[i] - gt) / (kg[i] - kg[i + 1])), ""
    t = (math.log(gt) - math.log(kg[i])) / (math.log(kg[i + 1]) - math.log(kg[i]))
    return float(math.exp(math.log(kx[i]) + t * (math.log(kx[i + 1]) - math.log(kx[i])))), ""


@dataclass
class Recommendation:
    table: pd.DataFrame  # run, layer, fan_in, n_weights, flip_ratio, threshold, recommended_threshold, ...
    target: dict  # run -> target flip ratio
    snippet: str
    method: str


def recommended_thresholds(table: pd.DataFrame, target: float | None = None) -> Recommendation:
    """Per-layer τ giving the target flip ratio (default: per run, the median layer flip ratio over the window)."""
    cols = ["run", "family", "layer", "fan_in", "n_weights", "flip_ratio", "threshold", "recommended_threshold",
            "ratio_to_current", "bound"]
    qcols = [f"abs_m_{q}" for q in QUANTILES]
    rows, targets = [], {}
    bop = table[table["family"].isin(BOP_FAMILIES)]
    if set(qcols) <= set(bop.columns):
        for run, sub in bop.groupby("run", sort=False):
            tgt = float(target) if target is not None else float(np.nanmedian(sub["flip_ratio"]))
            targets[run] = tgt
            for r in sub.itertuples(index=False):
                d = r._asdict()
                q = np.array([d[c] for c in qcols], dtype=float)
                tau, fr = float(d.get("threshold", math.nan)), float(d["flip_ratio"])
                rec, bound = math.nan, ""
                if not np.all(np.isfinite(q)) or not math.isfinite(tau):
                    bound = "no |m| quantiles or threshold"
                elif fr <= 0:
                    bound = "no flips in the window: τ* < current τ, not estimable"
                else:
                    g_tau, b1 = tail_prob(tau, q)
                    rec, b2 = tail_inverse(g_tau * tgt / fr, q)
                    bound = "; ".join(b for b in (b1, b2) if b)
                if not math.isfinite(rec) and math.isfinite(tau):
                    rec, bound = tau, f"kept the current τ: {bound}"
                rows.append({"run": run, "family": d["family"], "layer": d["layer"], "fan_in": d.get("fan_in"),
                             "n_weights": d.get("n_weights"), "flip_ratio": fr, "threshold": tau,
                             "recommended_threshold": rec,
                             "ratio_to_current": rec / tau if tau and math.isfinite(rec) else math.nan,
                             "bound": bound})
    rec_df = pd.DataFrame(rows, columns=cols)
    return Recommendation(rec_df, targets, threshold_snippet(rec_df), METHOD)


def threshold_snippet(rec: pd.DataFrame) -> str:
    """Ready-to-paste code giving Bop the recommended per-layer thresholds (one parameter group per layer)."""
    if rec.empty:
        return ""
    run = rec["run"].iloc[0]
    sub = rec[(rec["run"] == run) & np.isfinite(rec["recommended_threshold"].astype(float))]
    if sub.empty:
        return ""
    opt = "Bop2ndOrder" if (sub["family"] == "bop2nd").any() else "Bop"
    lines = [f"# per-layer thresholds recommended from run {run!r}", "import bnn_probe.optim", "", "thresholds = {"]
    lines += [f"    {layer!r}: {tau:.3g}," for layer, tau in zip(sub["layer"], sub["recommended_threshold"],
                                                                 strict=True)]
    lines += ["}",
              "named = dict(model.named_parameters())",
              "binary_groups = [{\"params\": [named[name]], \"threshold\": tau} for name, tau in thresholds.items()]",
              f"optimizer = bnn_probe.optim.{opt}(binary_groups, gamma=1e-3)  # keep your gamma",
              "",
              "# or, from this report's table:",
              "# from bnn_probe.optim.thresholds import from_report",
              "# from bnn_probe.nn import named_binary_parameters",
              f"# policy = from_report(\"REPORT_DIR/tables/thresholds.csv\", run={run!r})",
              f"# optimizer = bnn_probe.optim.{opt}(policy.param_groups(named_binary_parameters(model), gamma=1e-3))"]
    return "\n".join(lines)
