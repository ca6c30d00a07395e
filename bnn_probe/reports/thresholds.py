"""Section 3 of a report: per-layer threshold needs (does one global Bop τ serve wide and thin layers?).

* :func:`layer_table` — per (run, layer): fan-in, flip ratio over the analysed window, |m| (Bop) or |w̃| (latent)
  quantiles, the threshold in force, the share of weights that never flipped and of weights that chatter.
* :func:`fan_in_law` — slopes of log(median |m|) and of log(flip ratio) against log(fan_in) with the layer as the
  unit (per-layer means over each network's seeds, intercept per network, t-intervals with df = #layers −
  #networks − 1), set against the batch-norm prediction −0.5 by TOST (:func:`bn_equivalence_verdict`); verdicts.
* :func:`recommended_thresholds` — per layer the τ that would give it the target flip ratio.

Method of the recommendation ("margin ladder", documented in docs/reports.md): Bop flips a weight when its
pre-decision margin x = w_{t−1}·m_t exceeds τ (Helwegen et al. 2019; Bop2ndOrder: with m̂, Suarez-Ramirez et al.
2021). The probe counts #{x > k·τ} at the ladder k = 1/8 … 8 every step; averaged over the analysed window this is
the layer's exceedance curve R_l(k·τ). τ*_l is read off it where R_l = target, interpolating log R linearly in log τ
between the two ladder points around the target (never extrapolated: a target outside the ladder gives the ladder
end, τ/8 or 8τ, and says so in ``bound``). The elasticity d log R/d log τ at the current τ is the slope between τ/2
and 2τ. Logs without the ladder (written before it existed) fall back to "tail matching" (:func:`tail_prob`,
:data:`TAIL_METHOD`), documented as such in the table's ``method`` column.

Method "flow" (:func:`flow_threshold`, :data:`FLOW_METHOD`): the flip ratio as a flow, r(τ) = v/(2(τ + ō)): after
a flip the margin restarts at −(τ + overshoot) and travels to the next flip at τ + overshoot; ō, the mean overshoot
at the flip step, is read off the ladder above τ; v is eliminated with the measured flip ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..runlog.schema import MARGIN_EXCEED, MARGIN_LADDER, MARGIN_LADDER_NAMES
from . import stats
from .frames import BOP_FAMILIES, QUANTILE_P, QUANTILES, analysis_window, concat, family, frame, pi_metric, run_name

CHATTER_MIN_FLIPS = 10
MARGIN_RATES = tuple(f"margin_rate_{k}" for k in MARGIN_LADDER_NAMES)
MARGIN_TAIL = (("margin_q99", 0.99), ("margin_q999", 0.999))  # upper quantiles of w_{t−1}·m_t extending the ladder
LADDER_METHOD = (
    "Margin ladder: Bop flips a weight when its pre-decision margin w_{t−1}·m_t (Bop2ndOrder: w_{t−1}·m̂_t) exceeds τ. "
    "The probe counts, every step, the weights whose margin exceeds k·τ for k = 1/8, 1/4, 1/2, 1, 2, 4, 8; averaged "
    "over the analysed window and divided by the layer's size this is the exceedance curve R_l(k·τ) (at k = 1 it is "
    "the flip ratio). τ*_l is the τ where R_l equals the target, log R interpolated linearly in log τ between the two "
    "ladder points around the target; it is never extrapolated: a target outside the ladder gives the ladder end "
    "(τ/8 or 8τ), flagged in 'bound', and feeding the table back again moves τ further. 'elasticity' is "
    "d log R/d log τ at the current τ (the slope between τ/2 and 2τ). R_l is measured with the m_t of the run at "
    "its own τ, so it describes that run's margins, not a run at another τ: past the current τ it underestimates, "
    "below it overestimates the flips another τ would give, and a step of feedback undershoots rather than "
    "overshoots."
)
TAIL_METHOD = (
    "Tail matching: a weight flips when w·m > τ. With G_l(x) = P(|m| > x), the layer's |m| tail interpolated "
    "log-linearly through the recorded quantiles abs_m_q05…q95 (medians over the analysed window; linear from "
    "(0, 1) to q05; power-law extrapolation beyond q95), write P(w·m > τ) = c_l · G_l(τ), where c_l, the share of "
    "above-threshold weights whose momentum points along the weight, is estimated from the observed flip ratio "
    "(c_l = flip_ratio_l / G_l(τ_l)) and assumed not to depend on τ. The recommended τ*_l solves "
    "c_l · G_l(τ*_l) = target. Column 'bound' flags extrapolated or unreachable values. (Fallback for logs without "
    "the margin ladder; after Bop's step c_l is not a share of anything fixed — every weight with |m| > τ sits on "
    "the settled side — and it varies with τ.)"
)
FLOW_METHOD = (
    "Flow model: Bop flips a weight when its pre-decision margin x = w_{t−1}·m_t (Bop2ndOrder: w_{t−1}·m̂_t) exceeds "
    "τ, and the flip turns the margin into −x = −(τ + o), o the overshoot. The next flip happens when the margin has "
    "travelled from −(τ + o) to past τ, to τ + o', a distance 2τ + o + o' (2(τ + ō) on average); if it moves at a "
    "layer-specific pace v (set by the gradients, not by τ), the flip ratio is r(τ) = v/(2(τ + ō)), ō the mean "
    "overshoot. ō = ∫_τ^∞ R(y) dy / R(τ) is read off the margin ladder above τ (R(kτ), k = 1, 2, 4, 8: the share of "
    "weights whose margin at their flip exceeds kτ; power law between ladder points, past 8τ the last segment's "
    "power law, extended by the margin's upper quantiles q99 and q99.9 where they lie past 8τ, when it is integrable, "
    "else cut and flagged in 'bound'; where no margin reached 2τ, ō = "
    "min(0.583·RMS step of m, τ/2), the mean overshoot of a Gaussian random walk, Siegmund 1979). v drops out with "
    "the measured flip ratio r: τ* = (r/target)·(τ + ō) − ō. That holds while τ is small next to the spread σ of m "
    "over time; where it is not, reaching τ takes an excursion, and τ is replaced by the distance D(τ) = σ·F(τ/σ), "
    "F(a) = ∫_0^a e^{u²/2} du, of an Ornstein–Uhlenbeck margin (its mean first-passage time from −τ to τ is "
    "(√(2π)/γ)·F(τ/σ)): D(τ*) = (r/target)·(D(τ) + ō) − ō, with σ = RMS(Δm)/√(2γ) from the tracked weights' step "
    "sizes ('margin_sd'; D(τ) = τ without them). 'elasticity' is the model's d log r/d log τ = "
    "−τ·e^{τ²/2σ²}/(D(τ) + ō) at the current τ (−τ/(τ + ō) for τ ≪ σ: −1 when one step of the margin is small next "
    "to τ, towards 0 when steps overshoot τ and sign changes of m set the rate; steeper than −1 once τ nears σ); "
    "'elasticity_at_recommended' at τ*. A target above r(0) = r·(D(τ) + ō)/ō, or a τ* below τ/8, gives τ/8, "
    "flagged in 'bound'. Not modelled: a persistent drift of m (weights that a steady gradient keeps settled), and "
    "the coupling between layers (changing one layer's τ changes the others' gradients)."
)
METHOD = LADDER_METHOD
METHODS = ("ladder", "tail", "flow")
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


def _margin_rates(win: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean over the window of margin_exceed_k / n_weights (columns margin_rate_<k>); empty without the
    ladder columns (logs written before them) or the layer sizes."""
    if not set(MARGIN_EXCEED) <= set(win.columns) or layers.empty or "n_weights" not in layers:
        return pd.DataFrame(columns=["layer", *MARGIN_RATES])
    n = win["layer"].map(layers.set_index("layer")["n_weights"]).astype(float)
    rates = pd.DataFrame({r: win[c].astype(float) / n for c, r in zip(MARGIN_EXCEED, MARGIN_RATES, strict=True)})
    rates["layer"] = win["layer"].to_numpy()
    return rates.groupby("layer")[list(MARGIN_RATES)].mean().reset_index()


def _step_rms(tracked: pd.DataFrame, win: pd.DataFrame) -> pd.DataFrame:
    """Per layer: RMS over the tracked weights and the window's steps of the tracked ``step_size`` (Bop family:
    |m_t − m_{t−1}|, Bop2ndOrder: of m̂) as ``step_size_rms``; empty without that column."""
    if tracked.empty or not {"step", "layer", "step_size"} <= set(tracked.columns) or win.empty:
        return pd.DataFrame(columns=["layer", "step_size_rms"])
    t = tracked[(tracked["step"] >= win["step"].min()) & np.isfinite(tracked["step_size"].astype(float))]
    sq = t.assign(sq=t["step_size"].astype(float) ** 2).groupby("layer")["sq"].mean()
    return pd.DataFrame({"layer": sq.index, "step_size_rms": np.sqrt(sq.to_numpy())})


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
        for c, _ in MARGIN_TAIL:
            if c in win:
                cols[c] = (c, "median")
        if "threshold" in win:
            cols["threshold"] = ("threshold", "median")
        if "gamma" in win:
            cols["gamma"] = ("gamma", "median")
        g = win.groupby("layer").agg(**cols).reset_index()
        if not layers.empty:
            keep = [c for c in ("layer", "fan_in", "fan_out", "n_weights") if c in layers]
            g = g.merge(layers[keep], on="layer", how="left")
            if "threshold" not in g and "threshold" in layers:
                g = g.merge(layers[["layer", "threshold"]], on="layer", how="left")
        g = g.merge(_chatter(frame(run, "weight_flips"), chatter_min), on="layer", how="left")
        g = g.merge(_margin_rates(win, layers), on="layer", how="left")
        g = g.merge(_step_rms(frame(run, "tracked"), win), on="layer", how="left")
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
    points: pd.DataFrame  # run, family, network, layer, fan_in, abs_m_q50, flip_ratio, seed (per run and layer)
    slopes: pd.DataFrame  # family, quantity, slope, ci_lo, ci_hi, n, df, n_fan_in, n_seeds, method
    verdicts: list[stats.Verdict] = field(default_factory=list)
    fit: pd.DataFrame = field(default_factory=pd.DataFrame)  # family, run (= network), quantity, fan_in, fitted
    units: pd.DataFrame = field(default_factory=pd.DataFrame)  # family, quantity, network, layer, fan_in, y, n_seeds


BN_MARGIN = 0.1  # equivalence margin (slope units) of "the slope equals −0.5" (TOST)
MIN_SEEDS = 3


def network_of(table: pd.DataFrame) -> pd.Series:
    """Per row of a layer table: its run's architecture, named by the run's (layer, fan-in) list. Runs with the same
    layers are the same network, whatever their seed, τ or γ: their layers are the same units."""
    sig = table.groupby("run")[["layer", "fan_in"]].apply(
        lambda g: ", ".join(f"{layer}:{int(n) if np.isfinite(n) else '?'}" for layer, n in
                            sorted(zip(g["layer"], g["fan_in"].astype(float), strict=True))))
    return table["run"].map(sig)


def _fit_lines(fam: str, units: pd.DataFrame, quantity: str, s: stats.Slope) -> list[dict]:
    """Line per network (intercept per network, the common slope), and the −0.5 reference for |m|."""
    rows = []
    if not math.isfinite(s.slope):
        return rows
    for net, a in s.intercepts.items():
        f = units.loc[units["network"] == net, "fan_in"].astype(float)
        for x in (f.min(), f.max()):
            rows.append({"family": fam, "run": net, "quantity": quantity, "fan_in": x,
                         "fitted": math.exp(a + s.slope * math.log(x))})
    if quantity == "median |m|" and rows:
        lm, lf = units["y"].astype(float), np.log(units["fan_in"].astype(float))
        a = float(lm.mean() - PREDICTION * lf.mean())
        for x in (float(np.exp(lf.min())), float(np.exp(lf.max()))):
            rows.append({"family": fam, "run": "", "quantity": quantity + " (-0.5 reference)", "fan_in": x,
                         "fitted": math.exp(a + PREDICTION * math.log(x))})
    return rows


def bn_equivalence_verdict(slope: stats.Slope, too_little: str = "", margin: float = BN_MARGIN,
                           target: float = PREDICTION) -> tuple[str, str, tuple[float, float] | None]:
    """"The slope equals −0.5" as an equivalence test (two one-sided tests, Schuirmann 1987) with margin δ:

    supported when the 90 % t-interval of the slope lies inside [−0.5 − δ, −0.5 + δ] (both one-sided tests reject at
    α = 0.05); not supported when the 95 % interval lies entirely outside that band (the slope differs from −0.5 by
    more than δ); inconclusive otherwise, or when ``too_little`` says why the data cannot decide. Returns (verdict,
    reason, 90 % interval).

    >>> bn_equivalence_verdict(stats.Slope(-0.48, (-0.52, -0.44), 10, 8, ""))[0]
    'supported'
    >>> bn_equivalence_verdict(stats.Slope(-0.1, (-0.2, 0.0), 10, 8, ""))[0]
    'not supported'
    """
    lo95, hi95 = slope.interval
    if too_little or not (math.isfinite(slope.slope) and math.isfinite(lo95) and slope.df >= 1):
        return stats.INCONCLUSIVE, too_little or "no slope estimate", None
    from scipy import stats as st

    se = (hi95 - lo95) / (2 * float(st.t.ppf(0.975, slope.df)))
    h90 = float(st.t.ppf(0.95, slope.df)) * se
    lo90, hi90 = slope.slope - h90, slope.slope + h90
    band = (target - margin, target + margin)
    if band[0] <= lo90 and hi90 <= band[1]:
        return (stats.SUPPORTED, f"TOST: the 90 % interval [{lo90:.3f}, {hi90:.3f}] lies within −0.5 ± {margin:g}",
                (lo90, hi90))
    if lo95 > band[1] or hi95 < band[0]:
        return (stats.NOT_SUPPORTED, f"the 95 % interval lies outside −0.5 ± {margin:g} (equivalence margin)",
                (lo90, hi90))
    return (stats.INCONCLUSIVE, f"TOST cannot show equivalence within −0.5 ± {margin:g} (90 % interval "
            f"[{lo90:.3f}, {hi90:.3f}]) nor a difference beyond it", (lo90, hi90))


def _layer_units(sub: pd.DataFrame, col: str, offset: float = 0.0) -> pd.DataFrame:
    """One row per (network, layer): the mean over that network's runs of log(col + offset); ``n_seeds`` counts the
    distinct seeds among those runs (column ``seed``)."""
    y = np.log(sub[col].astype(float) + offset)
    d = sub.assign(y=y)[np.isfinite(y) & (sub["fan_in"].astype(float) > 0)]
    return (d.groupby(["network", "layer"], sort=True)
            .agg(fan_in=("fan_in", "first"), y=("y", "mean"), n_seeds=("seed", "nunique")).reset_index())


def fan_in_law(table: pd.DataFrame, min_fan_ins: int = 3, negligible: float = 0.1,
               margin: float = BN_MARGIN, min_seeds: int = MIN_SEEDS, seeds: dict | None = None) -> FanInLaw:
    """The pooled fan-in law per Bop family from :func:`layer_table`'s rows, with the LAYER as the unit.

    The runs' layers are grouped by network (:func:`network_of`); per (network, layer) the log of the quantity is
    averaged over the network's runs (seeds, and τ or γ settings of the same architecture), and the slope is the OLS
    of those per-layer means on log fan_in with an intercept per network (t-interval, df = #layers − #networks − 1).
    Seeds of one layer are replicates of that layer, not independent evidence about a between-layer slope.

    The pooled slope mixes fan-in with depth and fan-out (in a network of mixed widths the wide layer is also a
    particular depth with a particular fan-out), so it answers "do this network's wide layers have smaller |m|?",
    not "does widening a layer shrink its |m|?"; the controlled width sweep (:mod:`.threshold_policies`) answers
    the latter. Verdicts ``thresholds.fan_in_pooled`` (|m| falls with fan-in), ``thresholds.fan_in_pooled.
    bn_prediction`` (slope −0.5, TOST with margin ``margin``) and ``thresholds.one_tau_wide_flip_less`` (under one
    τ, flip ratio falls with fan-in; only runs with one τ for all layers); inconclusive with fewer than
    ``min_seeds`` seeds of every network or fewer than ``min_fan_ins`` distinct fan-ins. ``seeds`` maps run → seed
    (runs of one seed with other τ or γ are not replicates); without it every run counts as its own seed.
    """
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
    pts.insert(2, "network", network_of(pts) if len(pts) else pd.Series(dtype=str))
    pts["seed"] = pts["run"].map(lambda r: (seeds or {}).get(r, r)).astype(str)
    slopes, verdicts, fit, units_all = [], [], [], []
    method = ("OLS of per-layer means (over each network's runs) of log y on log fan_in; the layer is the unit, "
              "intercept per network; t-interval")
    for fam, sub in pts.groupby("family", sort=True):
        label = "Bop2ndOrder, normalised m̂" if fam == "bop2nd" else "Bop"
        one_tau = sub[~per_layer_tau.loc[sub.index].to_numpy(dtype=bool)]
        res = {}
        for q, d, col, off in (("median |m|", sub, "abs_m_q50", 0.0),
                               ("flip ratio", one_tau, "flip_ratio", math.exp(-9))):
            u = _layer_units(d, col, off)
            s = stats.linear_slope(np.log(u["fan_in"].astype(float)), u["y"], u["network"], method=method)
            n_seeds = int(u["n_seeds"].max()) if len(u) else 0
            res[q] = (s, u, n_seeds, sorted(set(d["run"])))
            units_all.append(u.assign(family=fam, quantity=q))
            fit += _fit_lines(fam, u, q, s)
            slopes.append({"family": fam, "quantity": q, "slope": s.slope, "ci_lo": s.interval[0],
                           "ci_hi": s.interval[1], "n": s.n, "df": s.df, "n_fan_in": int(u["fan_in"].nunique()),
                           "n_seeds": n_seeds, "method": s.method})

        def why_not(u: pd.DataFrame, n_seeds: int, what: str = "") -> str:
            n_fan = int(u["fan_in"].nunique())
            if n_fan < min_fan_ins:
                return f"only {n_fan} distinct fan-in values{what} (< {min_fan_ins})"
            if n_seeds < min_seeds:
                return f"at most {n_seeds} seed(s) per network{what} (< {min_seeds} seeds)"
            return ""

        s_m, u_m, r_m, runs_m = res["median |m|"]
        few = why_not(u_m, r_m)
        v, why = stats.verdict_negative(s_m.slope, s_m.interval, 0 if few else min_fan_ins, min_fan_ins, negligible)
        verdicts.append(stats.Verdict(
            f"Wide layers need a smaller threshold than thin layers ({label}, pooled over the layers of the "
            f"networks): log median |m| falls with log fan_in", v, s_m.slope, s_m.interval, s_m.n, runs_m,
            "slope of log median |m| vs log fan_in (layers as units)", s_m.method, few or why, "thresholds",
            id="thresholds.fan_in_pooled" + ("" if fam == "bop" else f".{fam}")))
        v, why, _ = bn_equivalence_verdict(s_m, few, margin)
        verdicts.append(stats.Verdict(
            f"|m| scales like fan_in^-0.5, the batch-norm prediction ({label}, pooled)", v, s_m.slope, s_m.interval,
            s_m.n, runs_m, "slope of log median |m| vs log fan_in (layers as units)", s_m.method, why, "thresholds",
            id="thresholds.fan_in_pooled.bn_prediction" + ("" if fam == "bop" else f".{fam}")))
        s_f, u_f, r_f, runs_f = res["flip ratio"]
        few_f = "no run with one threshold for all its layers" if one_tau.empty else \
            why_not(u_f, r_f, " among runs with one threshold")
        v, why = stats.verdict_negative(s_f.slope, s_f.interval, 0 if few_f else min_fan_ins, min_fan_ins,
                                        negligible)
        verdicts.append(stats.Verdict(
            f"Under one threshold, wide layers flip less than thin layers ({label})", v, s_f.slope, s_f.interval,
            s_f.n, runs_f, "slope of log(flip ratio + e^-9) vs log fan_in (layers as units)", s_f.method,
            few_f or why, "thresholds", id="thresholds.one_tau_wide_flip_less" + ("" if fam == "bop" else f".{fam}")))
    if pts.empty:
        verdicts.append(stats.Verdict(
            "Wide layers need a smaller threshold than thin layers", stats.INCONCLUSIVE, None, None, 0, [],
            "slope of log median |m| vs log fan_in", "", "no Bop runs with per-layer |m| in the logs", "thresholds",
            id="thresholds.fan_in_pooled"))
    sl = pd.DataFrame(slopes, columns=["family", "quantity", "slope", "ci_lo", "ci_hi", "n", "df", "n_fan_in",
                                       "n_seeds", "method"])
    fit_df = pd.DataFrame(fit, columns=["family", "run", "quantity", "fan_in", "fitted"])
    units = (pd.concat(units_all, ignore_index=True) if units_all else
             pd.DataFrame(columns=["network", "layer", "fan_in", "y", "n_seeds", "family", "quantity"]))
    return FanInLaw(pts.reset_index(drop=True), sl, verdicts, fit_df, units)


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


def ladder_threshold(rates, tau: float, target: float) -> tuple[float, str, float, float]:
    """τ* where the exceedance curve R(k·τ) (``rates`` at the ladder k = 1/8 … 8) equals ``target``.

    Returns (τ*, bound, elasticity at τ, elasticity at τ*). Between two ladder points log R is linear in log τ:
    τ* = x_j · (x_{j+1}/x_j)^{(log target − log R_j)/(log R_{j+1} − log R_j)}, x_j = k_j·τ; where R_{j+1} = 0 (no
    weight that far out) R is taken linear in log τ on that segment. A target above R(τ/8) gives τ/8, one below R(8τ)
    gives 8τ, each named in ``bound`` (never extrapolated). Elasticity d log R/d log τ: at τ the slope between τ/2
    and 2τ; at τ* the slope of the segment used (NaN where a rate is 0)."""
    r = np.minimum.accumulate(np.asarray(rates, dtype=float))  # exceedance counts fall along the ladder
    k = np.asarray(MARGIN_LADDER)
    nan = math.nan
    if not (math.isfinite(tau) and tau > 0) or len(r) != len(k) or not np.all(np.isfinite(r)):
        return nan, "no margin ladder or τ ≤ 0", nan, nan
    with np.errstate(divide="ignore"):
        lr = np.where(r > 0, np.log(np.where(r > 0, r, 1.0)), np.nan)
    lk = np.log(k)
    i_half, i_two = MARGIN_LADDER.index(0.5), MARGIN_LADDER.index(2.0)
    e_tau = float((lr[i_two] - lr[i_half]) / (lk[i_two] - lk[i_half]))
    if not (target > 0):
        return nan, "target flip ratio 0", e_tau, nan
    if target > r[0]:
        return float(k[0] * tau), "at the ladder end τ/8: fewer flips than the target even at τ/8 (τ* < τ/8)", \
            e_tau, nan
    if target < r[-1]:
        return float(k[-1] * tau), "at the ladder end 8τ: more flips than the target even at 8τ (τ* > 8τ)", e_tau, nan
    j = int(np.nonzero(r >= target)[0][-1])  # last ladder point still at or above the target
    if r[j] == target or j == len(k) - 1:
        return float(k[j] * tau), "", e_tau, nan
    if r[j + 1] > 0:
        e = float((lr[j + 1] - lr[j]) / (lk[j + 1] - lk[j]))
        t = (math.log(target) - lr[j]) / (lr[j + 1] - lr[j])
    else:
        e = nan
        t = (r[j] - target) / (r[j] - r[j + 1])
    return float(tau * math.exp(lk[j] + t * (lk[j + 1] - lk[j]))), "", e_tau, e


SIEGMUND_RHO = 0.5826  # −ζ(1/2)/√(2π): mean overshoot of a Gaussian random walk over a far level, in step SDs


def mean_overshoot(rates, tau: float, step_rms: float = math.nan, tail=()) -> tuple[float, str]:
    """ō = E[x − τ | x > τ] = ∫_τ^∞ R(y) dy / R(τ) from the ladder rates at k·τ (k = 1/8 … 8; only k ≥ 1 used).

    Where no margin reached 2τ (R(2τ) = 0) the ladder only bounds ō below τ; then ō = min(ρ·s, τ/2), s the RMS step
    of the margin (``step_rms``) and ρ = −ζ(1/2)/√(2π) ≈ 0.583 the mean overshoot of a Gaussian random walk over a
    distant level in units of its step (Siegmund 1979), or τ/2 (the middle of the bound) without ``step_rms``.

    Between ladder points a = k_j·τ and b = k_{j+1}·τ, R(y) = R_a·(y/a)^{−s} with s = log(R_a/R_b)/log(b/a), so
    ∫_a^b R dy = R_a·a·(1 − (b/a)^{1−s})/(s − 1) (R_a·a·log(b/a) at s = 1); where R_b = 0 the segment is linear,
    R_a·(b − a)/2, and nothing lies beyond. ``tail``: further points (x, R(x)) past 8τ, from the margin's upper
    quantiles (x = q99 has R = 0.01, x = q99.9 has R = 0.001), used where they extend the curve (x > 8τ and R below
    R(8τ)). Past the last point: that segment's power law, R_b·b/(s − 1), when s > 1; otherwise the integral is cut
    there (a lower bound) and the returned flag says so. Returns (ō, flag); NaN when R(τ) = 0."""
    r = np.minimum.accumulate(np.asarray(rates, dtype=float))
    k = np.asarray(MARGIN_LADDER)
    i1 = MARGIN_LADDER.index(1.0)
    r, k = list(r[i1:]), list(k[i1:] * tau)
    for x, p in sorted((float(x), float(p)) for x, p in tail if math.isfinite(x) and math.isfinite(p)):
        if x > k[-1] and 0 < p < r[-1]:
            k.append(x)
            r.append(p)
    if not (r[0] > 0):
        return math.nan, "no flips at τ"
    total, flag = 0.0, ""
    if r[1] <= 0 and math.isfinite(step_rms) and step_rms > 0:
        return min(SIEGMUND_RHO * step_rms, tau / 2), ""
    for j in range(len(k) - 1):
        a, b, ra, rb = k[j], k[j + 1], r[j], r[j + 1]
        if rb <= 0:
            total += ra * (b - a) / 2
            return total / r[0], flag
        s = math.log(ra / rb) / math.log(b / a)
        total += ra * a * math.log(b / a) if abs(s - 1) < 1e-9 else ra * a * (1 - (b / a) ** (1 - s)) / (s - 1)
    if s > 1:
        total += r[-1] * k[-1] / (s - 1)
    else:
        end = "8τ" if len(k) == 4 else f"{k[-1] / tau:.3g}τ (margin quantile)"
        flag = f"overshoot tail past {end} not integrable (slope ≥ −1 there): ō cut at {end}, a lower bound"
    return total / r[0], flag


def margin_distance(tau: float, sigma: float = math.nan) -> float:
    """D(τ) = σ·F(τ/σ), F(a) = ∫_0^a e^{u²/2} du = √(π/2)·erfi(a/√2): the distance term of the flow model for a
    margin that fluctuates like an Ornstein–Uhlenbeck process of stationary standard deviation σ (D(τ) → τ for
    τ ≪ σ; D = τ when σ is unknown, NaN). Returns inf where erfi overflows (τ > 37σ)."""
    if not (math.isfinite(sigma) and sigma > 0):
        return float(tau)
    a = tau / sigma
    if a > 37.0:
        return math.inf
    from scipy.special import erfi

    return float(sigma * math.sqrt(math.pi / 2) * erfi(a / math.sqrt(2)))


def flow_threshold(rates, tau: float, flip_ratio: float, target: float,
                   sigma: float = math.nan, step_rms: float = math.nan,
                   tail=()) -> tuple[float, str, float, float, float]:
    """τ* from the flow model of flips: r(τ) = v/(2(D(τ) + ō)) (:data:`FLOW_METHOD`).

    Bop flips a weight when its margin x = w_{t−1}·m_t exceeds τ (Helwegen et al. 2019), at x_k = τ + o_k (o_k the
    overshoot of flip k), and the flip turns the margin into −x_k. The next flip comes when the margin, moving
    towards the weight's other sign, has travelled from −(τ + o_k) to τ + o_{k+1}: a distance 2τ + o_k + o_{k+1},
    2(τ + ō) on average. At a pace v per step that does not depend on τ (it is set by the gradients), the time
    between flips is 2(τ + ō)/v and the flip ratio r(τ) = v/(2(τ + ō)). This holds while τ is small next to the
    spread σ of m over time. Where it is not, reaching τ takes an excursion: for m an Ornstein–Uhlenbeck process
    (Bop's m_t = (1 − γ)m_{t−1} + γg_t with noisy gradients) the mean first-passage time from −τ to τ is
    (√(2π)/γ)·F(τ/σ), F(a) = ∫_0^a e^{u²/2} du (Gardiner, Handbook of Stochastic Methods, §5.2.7), which is
    √(2π)τ/(γσ) for τ ≪ σ and grows like e^{τ²/2σ²} beyond; so τ is replaced by D(τ) = σ·F(τ/σ)
    (:func:`margin_distance`). σ is the stationary standard deviation of the AR(1) m, σ = RMS(Δm)/√(2γ)
    (Var Δm = γ²(σ_g² + σ²), σ² = γσ_g²/(2 − γ)), from the tracked weights' step sizes; without it D(τ) = τ.

    With ō from the ladder (:func:`mean_overshoot`, assumed not to depend on τ: it is set by the size of one step
    of m; ``step_rms`` is that step, used where the ladder cannot resolve ō) and v = 2r(D(τ) + ō) from the measured
    flip ratio r, r(τ*) = target gives

        D(τ*) = (r/target)·(D(τ) + ō) − ō        (with D(τ) = τ:  τ* = (r/target)·(τ + ō) − ō),

    and the model's elasticity d log r/d log τ = −τ·e^{τ²/2σ²}/(D(τ) + ō): −τ/(τ + ō) ∈ (−1, 0] for τ ≪ σ (−1 when
    one step of the margin is small next to τ, towards 0 when steps overshoot τ and sign changes of m set the
    rate), steeper than −1 once τ reaches σ. A τ* below τ/8 (including targets above r(0) = r·(D(τ) + ō)/ō, which
    no τ reaches) gives τ/8, named in ``bound``. Returns (τ*, bound, elasticity at τ, elasticity at τ*, ō).

    >>> round(flow_threshold([1, 1, 1, 0.1, 0.0, 0.0, 0.0], 1.0, 0.1, 0.05)[0], 6)  # ō = 0.5: τ* = 2·1.5 − 0.5
    2.5
    """
    nan = math.nan
    if not (math.isfinite(tau) and tau > 0) or len(rates) != len(MARGIN_LADDER) or not np.all(np.isfinite(rates)):
        return nan, "no margin ladder or τ ≤ 0", nan, nan, nan
    if not (flip_ratio > 0):
        return nan, "no flips in the window: the flow is not measured", nan, nan, nan
    o, flag = mean_overshoot(rates, tau, step_rms, tail)
    if not math.isfinite(o):
        return nan, "no margin above τ on the ladder", nan, nan, nan
    sig = sigma if math.isfinite(sigma) and sigma > 0 else math.inf

    def elasticity(t: float) -> float:
        d = margin_distance(t, sigma)
        return -t * math.exp(min((t / sig) ** 2 / 2, 700.0)) / (d + o) if math.isfinite(d) else -math.inf

    d_tau = margin_distance(tau, sigma)
    e_tau = elasticity(tau)
    if not (target > 0):
        return nan, "target flip ratio 0", e_tau, nan, o
    need = (flip_ratio / target) * (d_tau + o) - o  # D(τ*)
    bound = flag
    if need < margin_distance(tau / 8, sigma):
        why = ("the target needs more flips than τ → 0 gives (r(0) = r·(D(τ) + ō)/ō)" if need <= 0 else
               "τ* below τ/8")
        rec, bound = tau / 8, "; ".join(b for b in (f"at the floor τ/8: {why}", flag) if b)
    elif math.isinf(sig):
        rec = need
    else:
        from scipy.optimize import brentq

        hi = tau
        while margin_distance(hi, sigma) < need:
            hi *= 2
        rec = float(brentq(lambda t: margin_distance(t, sigma) - need, tau / 8, hi, xtol=tau * 1e-9))
    return float(rec), bound, e_tau, elasticity(rec), o


SECANT_MIN_MOVE = 1.2  # a layer's τ must have moved by this factor between the two runs to read a slope off them
SECANT_ELASTICITY = (-4.0, -0.1)  # realised elasticities outside are clipped (noise, coupling between layers)
SECANT_METHOD = (
    "Where a run was itself trained with recommended thresholds (--threshold-policy from-report) and the run they "
    "were recommended from is in the report, a layer whose τ moved by at least ×1.2 between the two gets its τ* from "
    "the secant through the two measured points instead: realised elasticity e = Δlog r/Δlog τ (clipped to [−4, "
    "−0.1]), τ* = τ·(target/r)^(1/e), the move limited to ×8 either way (flagged in 'bound'); 'elasticity' is then e."
)


def secant_threshold(tau0: float, r0: float, tau1: float, r1: float, target: float) -> tuple[float, str, float]:
    """τ* from two runs of a layer, (τ0, r0) before and (τ1, r1) after a change of τ: the secant in log–log,

        e = (log r1 − log r0)/(log τ1 − log τ0),      τ* = τ1·(target/r1)^{1/e},

    e clipped to :data:`SECANT_ELASTICITY` and the move τ*/τ1 to [1/8, 8] (named in ``bound``). Returns (τ*, bound,
    e), or NaN when the two points do not give a slope (τ moved by less than :data:`SECANT_MIN_MOVE`, a rate of 0,
    or a rate that rose with τ).

    >>> secant_threshold(1.0, 0.04, 2.0, 0.01, 0.02)[0]  # e = −2: τ* = 2·(0.02/0.01)^(−1/2) = √2
    1.4142135623730951
    """
    nan = math.nan
    vals = (tau0, r0, tau1, r1, target)
    if not all(math.isfinite(v) and v > 0 for v in vals) or abs(math.log(tau1 / tau0)) < math.log(SECANT_MIN_MOVE):
        return nan, "", nan
    e = math.log(r1 / r0) / math.log(tau1 / tau0)
    if e >= 0:
        return nan, "", e
    e_used = min(max(e, SECANT_ELASTICITY[0]), SECANT_ELASTICITY[1])
    move = (target / r1) ** (1 / e_used)
    bound = "" if e_used == e else f"realised elasticity {e:.2f} clipped to {e_used:g}"
    if not 1 / 8 <= move <= 8:
        move = min(max(move, 1 / 8), 8.0)
        bound = "; ".join(b for b in (bound, "move limited to ×8 per round") if b)
    return tau1 * move, bound, e_used


@dataclass
class Recommendation:
    table: pd.DataFrame  # run, layer, fan_in, n_weights, flip_ratio, threshold, recommended_threshold, ...
    target: dict  # run -> target flip ratio
    snippet: str
    method: str


def recommended_thresholds(table: pd.DataFrame, target: float | None = None,
                           gamma: dict | None = None, method: str = "ladder",
                           sources: dict | None = None) -> Recommendation:
    """Per-layer τ giving the target flip ratio (default: per run, the median layer flip ratio over the window):
    ``method="ladder"`` (default): from the margin ladder where the log has it (:func:`ladder_threshold`), else by
    tail matching (fallback); ``method="flow"``: the flow model (:func:`flow_threshold`) where the log has the
    ladder, else tail matching; ``method="tail"``: tail matching for every layer. ``gamma``: run → Bop's γ, for the
    snippet (default: the table's ``gamma`` column, if any). ``sources``: run → the run whose recommendation it was
    trained with (feedback chains); with ``method="flow"`` a fed run's layers whose τ moved get the secant through
    the two runs (:func:`secant_threshold`) instead of the flow model."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    cols = ["run", "family", "layer", "fan_in", "n_weights", "flip_ratio", "threshold", "recommended_threshold",
            "ratio_to_current", "bound", "elasticity", "elasticity_at_recommended", "mean_overshoot", "margin_sd",
            "method"]
    qcols = [f"abs_m_{q}" for q in QUANTILES]
    rows, targets = [], {}
    bop = table[table["family"].isin(BOP_FAMILIES)]
    before = {(r, layer): (float(t), float(f)) for r, layer, t, f in
              zip(bop["run"], bop["layer"], bop.get("threshold", pd.Series(math.nan, index=bop.index)),
                  bop["flip_ratio"], strict=True)}
    if (set(qcols) | set(MARGIN_RATES)) & set(bop.columns):
        for run, sub in bop.groupby("run", sort=False):
            tgt = float(target) if target is not None else float(np.nanmedian(sub["flip_ratio"]))
            targets[run] = tgt
            for r in sub.itertuples(index=False):
                d = r._asdict()
                q = np.array([d.get(c, math.nan) for c in qcols], dtype=float)
                tau, fr = float(d.get("threshold", math.nan)), float(d["flip_ratio"])
                rec, bound = math.nan, ""
                lad = np.array([d.get(c, math.nan) for c in MARGIN_RATES], dtype=float)
                e_tau = e_rec = o = sd = math.nan
                how = "margin ladder"
                has_ladder = np.all(np.isfinite(lad)) and math.isfinite(tau) and tau > 0
                if method == "ladder" and has_ladder:
                    rec, bound, e_tau, e_rec = ladder_threshold(lad, tau, tgt)
                elif method == "flow" and has_ladder and fr > 0:
                    how = "flow"
                    gam = float(d.get("gamma", math.nan))
                    step = float(d.get("step_size_rms", math.nan))
                    sd = step / math.sqrt(2 * gam) if gam > 0 and step > 0 else math.nan
                    tail = [(d.get(c, math.nan), 1 - p) for c, p in MARGIN_TAIL]
                    rec, bound, e_tau, e_rec, o = flow_threshold(lad, tau, fr, tgt, sd, step, tail)
                    prev = before.get(((sources or {}).get(run), d["layer"]))
                    if prev is not None:
                        sec, sec_bound, e_sec = secant_threshold(prev[0], prev[1], tau, fr, tgt)
                        if math.isfinite(sec):
                            how, rec, bound, e_tau, e_rec = "flow, secant through the source run", sec, sec_bound, \
                                e_sec, e_sec
                elif not np.all(np.isfinite(q)) or not math.isfinite(tau):
                    how = "none"
                    bound = "no |m| quantiles or threshold"
                elif fr <= 0:
                    bound = "no flips in the window: τ* < current τ, not estimable"
                else:
                    how = "tail matching" if method == "tail" else "tail matching (no margin ladder in the log)"
                    if method == "flow" and has_ladder:
                        how = "tail matching (no flips in the window for the flow model)"
                    g_tau, b1 = tail_prob(tau, q)
                    rec, b2 = tail_inverse(g_tau * tgt / fr, q)
                    bound = "; ".join(b for b in (b1, b2) if b)
                if not math.isfinite(rec) and math.isfinite(tau):
                    rec, bound = tau, f"kept the current τ: {bound}"
                rows.append({"run": run, "family": d["family"], "layer": d["layer"], "fan_in": d.get("fan_in"),
                             "n_weights": d.get("n_weights"), "flip_ratio": fr, "threshold": tau,
                             "recommended_threshold": rec,
                             "ratio_to_current": rec / tau if tau and math.isfinite(rec) else math.nan,
                             "bound": bound, "elasticity": e_tau, "elasticity_at_recommended": e_rec,
                             "mean_overshoot": o, "margin_sd": sd, "method": how})
    rec_df = pd.DataFrame(rows, columns=cols)
    if gamma is None and "gamma" in bop:
        gamma = {run: float(np.nanmedian(g.astype(float))) for run, g in bop.groupby("run", sort=False)["gamma"]
                 if np.isfinite(g.astype(float)).any()}
    methods = set(rec_df["method"])
    main = FLOW_METHOD if method == "flow" else LADDER_METHOD
    if any(m.startswith("flow, secant") for m in methods):
        main = FLOW_METHOD + " " + SECANT_METHOD
    text = TAIL_METHOD if methods and not methods & {"margin ladder", "flow"} else main
    if methods & {"margin ladder", "flow"} and any(m.startswith("tail") for m in methods):
        text = main + " " + TAIL_METHOD
    return Recommendation(rec_df, targets, threshold_snippet(rec_df, gamma), text)


def threshold_snippet(rec: pd.DataFrame, gamma: dict | None = None) -> str:
    """Ready-to-paste code giving Bop the recommended per-layer thresholds (one parameter group per layer), with the
    run's own γ (``gamma``: run → γ; "YOUR_GAMMA" when the log does not say)."""
    if rec.empty:
        return ""
    run = rec["run"].iloc[0]
    g = (gamma or {}).get(run, math.nan)
    g_txt = f"{g:.3g}" if isinstance(g, float) and math.isfinite(g) else "YOUR_GAMMA"
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
              f"optimizer = bnn_probe.optim.{opt}(binary_groups, gamma={g_txt})  # the run's γ",
              "",
              "# or, from this report's table:",
              "# from bnn_probe.optim.thresholds import from_report",
              "# from bnn_probe.nn import named_binary_parameters",
              f"# policy = from_report(\"REPORT_DIR/tables/thresholds.csv\", run={run!r})",
              f"# optimizer = bnn_probe.optim.{opt}(policy.param_groups(named_binary_parameters(model), "
              f"gamma={g_txt}))"]
    return "\n".join(lines)
