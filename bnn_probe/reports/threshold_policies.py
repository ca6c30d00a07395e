"""Report section: do per-layer Bop thresholds help? A comparison of threshold policies over seeds.

For runs that differ in their threshold policy (``global`` at several τ, ``fan-in``, ``calibrated``,
``from-report``), Bop2ndOrder, latent Adam and the no-batch-norm variant, grouped by (dataset, model, variant)
with the seeds as replicates:

* validation accuracy: mean over seeds and its 95 % t-interval (mean ± t_{n−1, 0.975} · s/√n);
* spread of per-layer flip ratios within a run: the coefficient of variation across layers,
  CV = std_l(r_l) / mean_l(r_l) (population std over the L binary layers, r_l the layer's mean flip ratio over the
  analysed window), then its mean and t-interval over seeds;
* the share of frozen weights per layer: weights that never flipped during the run (the ``weight_flips`` table's
  ``flips_per_weight == 0`` share at the last step), mean over seeds;
* a verdict per (dataset, model): each Bop per-layer policy against the best global τ of that dataset and model
  (by mean accuracy). The statistic is the difference in mean validation accuracy, with a Welch t-interval.
  "supported" when some per-layer policy's interval lies above 0; "not supported" when every per-layer policy's
  interval lies below +``negligible`` (no gain worth having); otherwise "inconclusive". Choosing the best of the
  global τ values on the same data favours the global policy, so a "supported" here is conservative.

The variant of a run is ``config["variant"]`` when the runner or study set it, else derived from the config
(``global τ=1e-06``, ``fan-in a=0.5``, ``calibrated r*=0.001``, ``from-report``, ``Bop2ndOrder``, ``latent``,
with `` no-BN scale=fan_in`` appended for runs without batch norm).

Example:
    >>> from bnn_probe.reports.synthetic import make_run
    >>> runs = [make_run(f"g{s}", seed=s, config={"variant": "global", "dataset": "d", "model": "m", "seed": s})
    ...         for s in range(3)]
    >>> res = policy_comparison(runs)
    >>> res.table[["variant", "n_seeds"]].values.tolist()
    [['global', 3]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats as _st

from . import stats
from .frames import config, family, meta, run_name
from .stats import t_interval
from .tau_sweep import is_tau_sweep
from .thresholds import BN_MARGIN, bn_equivalence_verdict, layer_table
from .training import runs_table

PER_LAYER_POLICIES = ("fan-in", "calibrated", "from-report", "normalized")
NEGLIGIBLE_ACCURACY = 0.005  # half a percentage point


def variant(run) -> str:
    """The label grouping a run with its seed replicates (see the module docstring)."""
    c = config(run)
    if c.get("variant"):
        return str(c["variant"])
    fam = family(run)
    pol = c.get("threshold_policy")
    if isinstance(pol, dict):
        pol = pol.get("name")
    if fam == "latent":
        label = f"latent {c.get('optimizer', '')}".strip()
    elif fam == "bop2nd":
        label = f"Bop2ndOrder τ={c.get('threshold', '')}"
    elif pol in (None, "", "global"):
        tau = c.get("threshold")
        if tau is None:
            groups = (meta(run).get("optimizer") or {}).get("groups") or [{}]
            tau = groups[0].get("threshold", "")
        label = f"global τ={tau}"
    elif pol == "fan-in":
        label = f"fan-in a={c.get('fan_in_exponent', 0.5)}"
    elif pol == "calibrated":
        label = f"calibrated r*={c.get('target_flip_ratio', '')}"
    elif pol == "normalized":
        rec = (c.get("extra") or {}).get("threshold_policy")
        args = rec.get("args", {}) if isinstance(rec, dict) else {}  # the policy as it ran (a policy object given
        scale = args.get("scale") or c.get("threshold_scale") or "mean_abs"  # to train() is recorded only there)
        balance = args.get("balance") or c.get("threshold_balance")
        label = "normalized" + (f" scale={scale}" if scale != "mean_abs" else "") + \
            (f" balance={balance}" if balance else "")
    else:
        label = str(pol)
    if c.get("batch_norm") is False:
        label += f" no-BN scale={c.get('weight_scale', 'none')}"
    return label


def model_label(run) -> str:
    """``config["model"]``, with the MLP widths when the config has them (``"mlp [2048, 64, 1024]"``)."""
    c = config(run)
    model = str(c.get("model", ""))
    widths = c.get("widths")
    if widths and "[" not in model:
        model = f"{model} {list(widths)}"
    return model


def is_sweep(run) -> bool:
    """A run of the controlled width sweep (tag ``thresholds-sweep``, or a config variant starting with "sweep")."""
    return meta(run).get("tag") == "thresholds-sweep" or str(config(run).get("variant", "")).startswith("sweep")


def policy_of(run) -> str:
    """The threshold policy name of a Bop run (``global`` when none is recorded), ``""`` for other families."""
    if family(run) not in ("bop", "bop2nd"):
        return ""
    c = config(run)
    pol = c.get("threshold_policy") or "global"
    return str(pol.get("name", "global") if isinstance(pol, dict) else pol)


def cv(values) -> float:
    """Coefficient of variation std/mean (population std) of the finite values; nan for fewer than 2 or mean 0.

    >>> round(cv([1.0, 3.0]), 6)   # std 1, mean 2
    0.5
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2 or v.mean() == 0:
        return math.nan
    return float(v.std() / v.mean())


def cv_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi) of per-seed CVs: :func:`t_interval` with the lower end cut at 0, the floor of a CV (a
    t-interval over 3 seeds can reach below it).

    >>> [round(x, 4) for x in cv_interval([0.01, 0.05, 0.12])]
    [0.06, 0.0, 0.1983]
    """
    m, lo, hi = t_interval(values, level)
    return m, (max(lo, 0.0) if math.isfinite(lo) else lo), hi


def welch_interval(a, b, level: float = 0.95) -> tuple[float, float, float]:
    """Difference of means mean(a) − mean(b) with a Welch t-interval (nan when either has fewer than 2 values, or
    when neither varies: zero observed spread is no evidence of zero uncertainty, so no interval is claimed)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan, math.nan
    d = float(a.mean() - b.mean())
    if a.size < 2 or b.size < 2:
        return d, math.nan, math.nan
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se <= 1e-12 * max(1.0, abs(float(a.mean())), abs(float(b.mean()))):  # no spread beyond float rounding
        return d, math.nan, math.nan
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    h = float(_st.t.ppf(1 - (1 - level) / 2, df) * se)
    return d, d - h, d + h


@dataclass
class PolicyComparison:
    runs: pd.DataFrame  # run, dataset, model, variant, policy, family, seed, val_accuracy, flip_ratio_cv
    table: pd.DataFrame  # dataset, model, variant, policy, n_seeds, val_acc_mean/lo/hi, cv_mean/lo/hi
    frozen: pd.DataFrame  # dataset, model, variant, layer, fan_in, frozen_share (mean over seeds), n_seeds
    verdicts: list[stats.Verdict] = field(default_factory=list)
    comparisons: pd.DataFrame = field(default_factory=pd.DataFrame)  # COMPARISON_COLUMNS: paired, Holm-corrected


def policy_comparison(runs, window: float = 0.5, negligible: float = NEGLIGIBLE_ACCURACY) -> PolicyComparison:
    """The comparison described in the module docstring, from run logs (anything shaped like a ``Run``)."""
    runs = [r for r in runs if not is_sweep(r) and not is_tau_sweep(r)]
    layers = layer_table(runs, window)
    acc, _ = runs_table(runs)
    acc = acc.set_index("run")["final_val_accuracy"] if len(acc) else pd.Series(dtype=float)
    rows = []
    for run in runs:
        name = run_name(run)
        c = config(run)
        lt = layers[layers["run"] == name]
        rows.append({"run": name, "dataset": str(c.get("dataset", "")), "model": model_label(run),
                     "variant": variant(run), "policy": policy_of(run), "family": family(run),
                     "seed": c.get("seed", ""), "val_accuracy": float(acc.get(name, math.nan)),
                     "flip_ratio_cv": cv(lt["flip_ratio"]) if len(lt) else math.nan,
                     "flip_ratio_network": network_flip_ratio(lt)})
    per_run = pd.DataFrame(rows, columns=["run", "dataset", "model", "variant", "policy", "family", "seed",
                                          "val_accuracy", "flip_ratio_cv", "flip_ratio_network"])
    keys = ["dataset", "model", "variant"]
    out = []
    for (ds, mo, va), sub in per_run.groupby(keys, sort=False):
        am, alo, ahi = t_interval(sub["val_accuracy"])
        cm, clo, chi = cv_interval(sub["flip_ratio_cv"])
        out.append({"dataset": ds, "model": mo, "variant": va, "policy": sub["policy"].iloc[0],
                    "family": sub["family"].iloc[0], "n_seeds": len(sub), "val_acc_mean": am, "val_acc_lo": alo,
                    "val_acc_hi": ahi, "cv_mean": cm, "cv_lo": clo, "cv_hi": chi})
    table = pd.DataFrame(out, columns=["dataset", "model", "variant", "policy", "family", "n_seeds", "val_acc_mean",
                                       "val_acc_lo", "val_acc_hi", "cv_mean", "cv_lo", "cv_hi"])
    lay = layers.merge(per_run[["run", *keys]], on="run", how="left")
    if len(lay):
        frozen = (lay.groupby([*keys, "layer"], sort=False)
                  .agg(fan_in=("fan_in", "first"), frozen_share=("never_flipped", "mean"),
                       flip_ratio=("flip_ratio", "mean"), n_seeds=("run", "nunique"))
                  .reset_index())
    else:
        frozen = pd.DataFrame(columns=[*keys, "layer", "fan_in", "frozen_share", "flip_ratio", "n_seeds"])
    pairs = [(ds, mo) for (ds, mo) in dict.fromkeys(zip(table["dataset"], table["model"], strict=True))
             if table[(table["dataset"] == ds) & (table["model"] == mo)]["policy"].isin(PER_LAYER_POLICIES).any()]
    verdicts, comps = [], []
    for ds, mo in pairs:
        for matched in (False, True):
            v, c = _verdict(per_run, table, ds, mo, negligible, matched=matched)
            verdicts.append(v)
            comps.append(c)
    comp = pd.concat(comps, ignore_index=True) if comps else pd.DataFrame(columns=COMPARISON_COLUMNS)
    return PolicyComparison(per_run, table, frozen, verdicts, comp)


COMPARISON_COLUMNS = ["dataset", "model", "comparison", "variant", "reference", "n_shared_seeds", "diff_mean",
                      "ci_lo", "ci_hi", "p", "p_holm", "flip_ratio_variant", "flip_ratio_reference"]


def network_flip_ratio(layers: pd.DataFrame) -> float:
    """Network-mean flip ratio of one run: Σ_l r_l · n_l / Σ_l n_l over its layers (layer-table rows).

    >>> network_flip_ratio(pd.DataFrame({"flip_ratio": [1e-3, 1e-4], "n_weights": [100, 900]}))
    0.00019
    """
    if layers.empty or "n_weights" not in layers:
        return math.nan
    n = layers["n_weights"].astype(float)
    ok = n.notna() & layers["flip_ratio"].notna()
    return float((layers["flip_ratio"][ok] * n[ok]).sum() / n[ok].sum()) if n[ok].sum() > 0 else math.nan


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): p_(i) · (m − i + 1), made monotone, capped at 1.

    >>> holm([0.01, 0.04, 0.03]).round(3).tolist()
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    m = p.size
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out


def paired_differences(per_run: pd.DataFrame, variant: str, reference: str, level: float = 0.95) -> dict:
    """Validation accuracy of ``variant`` minus ``reference`` over the seeds both have (paired): mean, t-interval at
    ``level``, two-sided one-sample t-test p-value; nan interval and p with fewer than 2 shared seeds."""
    a = per_run[per_run["variant"] == variant].groupby("seed")["val_accuracy"].mean()
    b = per_run[per_run["variant"] == reference].groupby("seed")["val_accuracy"].mean()
    shared = sorted(set(a.index) & set(b.index), key=str)
    d = (a.loc[shared] - b.loc[shared]).to_numpy(float) if shared else np.array([])
    m, lo, hi = t_interval(d, level)
    p = math.nan
    if d.size >= 2:
        sd = float(d.std(ddof=1))
        p = (0.0 if m != 0 else 1.0) if sd == 0 else float(2 * _st.t.sf(abs(m) / (sd / math.sqrt(d.size)),
                                                                         d.size - 1))
    return {"n_shared_seeds": len(shared), "diff_mean": m, "ci_lo": lo, "ci_hi": hi, "p": p}


def _verdict(per_run: pd.DataFrame, table: pd.DataFrame, ds: str, mo: str, negligible: float,
             matched: bool = False, alpha: float = 0.05, min_seeds: int = 3) -> tuple[stats.Verdict, pd.DataFrame]:
    """Each Bop per-layer policy against a global τ, paired over shared seeds, Holm-corrected over the policies.

    Reference: the best global τ by mean accuracy (``matched=False``, verdict ``thresholds.policies``), or the global
    τ whose network-mean flip ratio is closest (in log) to the policy's (``matched=True``, verdict
    ``thresholds.policies.matched_flip_rate``: a claim about allocating flips across layers, not their level).
    supported: some policy's Holm-adjusted p < α with a positive mean difference; not supported: every policy has
    ≥ ``min_seeds`` shared seeds and its Bonferroni interval (level 1 − α/K) lies below +``negligible``;
    inconclusive otherwise (e.g. fewer than ``min_seeds`` shared seeds)."""
    if matched:
        claim = (f"At a matched network-mean flip rate, per-layer Bop thresholds raise validation accuracy over a "
                 f"global τ ({ds}, {mo})")
        vid, ref_name = "thresholds.policies.matched_flip_rate", "the global τ closest in network-mean flip ratio"
    else:
        claim = f"Per-layer Bop thresholds raise validation accuracy over the best global τ ({ds}, {mo})"
        vid, ref_name = "thresholds.policies", "the best global τ by mean accuracy"
    here = per_run[(per_run["dataset"] == ds) & (per_run["model"] == mo) & (per_run["family"] == "bop")]
    tab = table[(table["dataset"] == ds) & (table["model"] == mo) & (table["family"] == "bop")]
    glob = tab[(tab["policy"] == "global") & ~tab["variant"].str.contains("no-BN")]
    per = tab[tab["policy"].isin(PER_LAYER_POLICIES) & ~tab["variant"].str.contains("no-BN")]
    name = "paired difference in validation accuracy (per-layer − global τ), mean over shared seeds"
    method = (f"paired t over shared seeds; reference: {ref_name}; Holm over {len(per)} polic"
              f"{'y' if len(per) == 1 else 'ies'}; interval: Bonferroni level 1 − α/K")
    empty = pd.DataFrame(columns=COMPARISON_COLUMNS)
    if glob.empty or per.empty:
        return stats.Verdict(claim, stats.INCONCLUSIVE, None, None, len(here), sorted(here["run"]), name, method,
                             "needs Bop runs with a global τ and with a per-layer policy", "thresholds", id=vid), empty
    fr = here.groupby("variant")["flip_ratio_network"].apply(
        lambda x: float(np.exp(np.log(x[x > 0]).mean())) if (x > 0).any() else math.nan)
    best = glob.sort_values("val_acc_mean", ascending=False)["variant"].iloc[0]
    k = len(per)
    rows = []
    for va in per["variant"]:
        ref = best
        if matched:
            dist = {g: abs(math.log(fr[va] / fr[g])) if fr.get(va, 0) > 0 and fr.get(g, 0) > 0 else math.inf
                    for g in glob["variant"]}
            ref = min(dist, key=dist.get)
        r = paired_differences(here, va, ref, level=1 - alpha / k)
        rows.append({"dataset": ds, "model": mo, "comparison": "matched flip rate" if matched else "best global τ",
                     "variant": va, "reference": ref, **r, "flip_ratio_variant": fr.get(va, math.nan),
                     "flip_ratio_reference": fr.get(ref, math.nan)})
    comp = pd.DataFrame(rows, columns=[c for c in COMPARISON_COLUMNS if c != "p_holm"])
    testable = comp["n_shared_seeds"] >= min_seeds
    comp["p_holm"] = math.nan
    if testable.any():
        comp.loc[testable, "p_holm"] = holm(comp.loc[testable, "p"].fillna(1.0))
    comp = comp[COMPARISON_COLUMNS]
    used = sorted(here[here["variant"].isin([*comp["variant"], *comp["reference"]])]["run"])
    if not testable.any():
        return stats.Verdict(claim, stats.INCONCLUSIVE, float(comp["diff_mean"].iloc[0]), None, len(used), used,
                             name, method, f"fewer than {min_seeds} shared seeds per comparison", "thresholds",
                             id=vid), comp
    t = comp[testable]
    wins = t[(t["p_holm"] < alpha) & (t["diff_mean"] > 0)]
    if len(wins):
        w = wins.sort_values("p_holm").iloc[0]
        return stats.Verdict(claim, stats.SUPPORTED, float(w["diff_mean"]), (float(w["ci_lo"]), float(w["ci_hi"])),
                             len(used), used, name, method,
                             f"{w['variant']} beats {w['reference']} (Holm-adjusted p = {w['p_holm']:.3g}, "
                             f"{int(w['n_shared_seeds'])} shared seeds)", "thresholds", id=vid), comp
    top = t.sort_values("diff_mean", ascending=False).iloc[0]
    stat, iv = float(top["diff_mean"]), (float(top["ci_lo"]), float(top["ci_hi"]))
    if testable.all() and (t["ci_hi"] < negligible).all():
        return stats.Verdict(claim, stats.NOT_SUPPORTED, stat, iv, len(used), used, name, method,
                             f"no per-layer policy's interval reaches a gain of {negligible:g} (best: "
                             f"{top['variant']} vs {top['reference']})", "thresholds", id=vid), comp
    untested = list(comp.loc[~testable, "variant"])
    why = (f"{', '.join(untested)} has fewer than {min_seeds} shared seeds" if untested else
           f"the intervals include 0 and gains above {negligible:g} (best: {top['variant']} vs {top['reference']})")
    return stats.Verdict(claim, stats.INCONCLUSIVE, stat, iv, len(used), used, name, method, why, "thresholds",
                         id=vid), comp


def cv_reduction(runs_before, runs_after, window: float = 0.5) -> pd.DataFrame:
    """Per pair (global-τ run, the from-report run fed its recommendation): CV of per-layer flip ratios before and
    after and their ratio (the recommendation works when the ratio is ≤ 0.5)."""
    before = layer_table(list(runs_before), window)
    after = layer_table(list(runs_after), window)
    rows = []
    for rb, ra in zip(runs_before, runs_after, strict=True):
        nb, na = run_name(rb), run_name(ra)
        cb, ca = cv(before[before["run"] == nb]["flip_ratio"]), cv(after[after["run"] == na]["flip_ratio"])
        rows.append({"run_global": nb, "run_from_report": na, "cv_global": cb, "cv_from_report": ca,
                     "ratio": ca / cb if cb else math.nan})
    return pd.DataFrame(rows, columns=["run_global", "run_from_report", "cv_global", "cv_from_report", "ratio"])


@dataclass
class WidthSweep:
    points: pd.DataFrame  # dataset, run, seed, layer, fan_in, abs_m_q50, flip_ratio, never_flipped
    slopes: pd.DataFrame  # dataset, quantity, slope, ci_lo, ci_hi, n, df, widths


def width_sweep(runs, window: float = 0.5) -> WidthSweep:
    """The controlled width sweep: in every sweep run, the second binary layer (fan-in = the varied width W,
    fixed depth and fan-out); per dataset, OLS slopes of log median |m| and of log(flip ratio + e^−9) against
    log W with an intercept per seed and a t-interval (:func:`bnn_probe.reports.stats.loglog_slope`)."""
    runs = [r for r in runs if is_sweep(r)]
    cols = ["dataset", "run", "seed", "layer", "fan_in", "abs_m_q50", "flip_ratio", "never_flipped"]
    scols = ["dataset", "quantity", "slope", "ci_lo", "ci_hi", "n", "df", "widths"]
    if not runs:
        return WidthSweep(pd.DataFrame(columns=cols), pd.DataFrame(columns=scols))
    lt = layer_table(runs, window)
    pts = []
    for run in runs:
        name = run_name(run)
        lay = lt[lt["run"] == name]
        order = list(frame_layers(run))
        if len(order) < 2 or lay.empty:
            continue
        row = lay[lay["layer"] == order[1]]
        if row.empty:
            continue
        r = row.iloc[0]
        pts.append({"dataset": str(config(run).get("dataset", "")), "run": name, "seed": config(run).get("seed", ""),
                    "layer": r["layer"], "fan_in": r["fan_in"], "abs_m_q50": r.get("abs_m_q50", math.nan),
                    "flip_ratio": r["flip_ratio"], "never_flipped": r.get("never_flipped", math.nan)})
    points = pd.DataFrame(pts, columns=cols)
    slopes = []
    for ds, sub in points.groupby("dataset", sort=True):
        for q, y in (("median |m|", sub["abs_m_q50"]), ("flip ratio", sub["flip_ratio"] + math.exp(-9))):
            sl = stats.loglog_slope(sub["fan_in"], y, sub["seed"].astype(str))
            slopes.append({"dataset": ds, "quantity": q, "slope": sl.slope, "ci_lo": sl.interval[0],
                           "ci_hi": sl.interval[1], "n": sl.n, "df": sl.df,
                           "widths": ",".join(str(int(w)) for w in sorted(sub["fan_in"].unique()))})
    return WidthSweep(points, pd.DataFrame(slopes, columns=scols))


def sweep_verdicts(sweep: WidthSweep, min_widths: int = 3, negligible: float = 0.1, min_seeds: int = 3,
                   margin: float = BN_MARGIN) -> list[stats.Verdict]:
    """Per dataset, from the controlled width sweep's |m| slope: ``thresholds.fan_in_controlled`` — "wide layers
    need a smaller threshold" (the slope is negative) — and ``thresholds.fan_in_controlled.bn_prediction`` — "|m|
    scales like fan_in^-0.5", an equivalence test (TOST) with margin ``margin``. The same claims as the pooled
    fan-in law, measured apart from depth and fan-out. Fewer than ``min_seeds`` seeds or ``min_widths`` widths:
    inconclusive."""
    out: list[stats.Verdict] = []
    pts = sweep.points
    for _, row in sweep.slopes[sweep.slopes["quantity"] == "median |m|"].iterrows():
        ds = row["dataset"]
        sub = pts[pts["dataset"] == ds]
        runs = sorted(sub["run"])
        n_w = len(str(row["widths"]).split(","))
        n_seeds = int(sub["seed"].nunique())
        interval = (float(row["ci_lo"]), float(row["ci_hi"]))
        few = (f"only {n_w} widths (< {min_widths})" if n_w < min_widths else
               f"{n_seeds} seed(s) (< {min_seeds})" if n_seeds < min_seeds else "")
        v, why = stats.verdict_negative(float(row["slope"]), interval, 0 if few else n_w, min_widths, negligible)
        name = "slope of log median |m| vs log W (controlled width sweep)"
        method = "OLS of log median |m| of the layer after width W on log W, intercept per seed, t-interval"
        out.append(stats.Verdict(
            f"Controlled width sweep ({ds}): wide layers need a smaller threshold — |m| of the layer after width W "
            f"falls with W", v, float(row["slope"]), interval, int(row["n"]), runs, name, method, few or why,
            "thresholds", id="thresholds.fan_in_controlled"))
        slope = stats.Slope(float(row["slope"]), interval, int(row["n"]), int(row["df"]), method)
        v, why, _ = bn_equivalence_verdict(slope, few, margin)
        out.append(stats.Verdict(
            f"Controlled width sweep ({ds}): |m| scales like W^-0.5, the batch-norm prediction", v,
            float(row["slope"]), interval, int(row["n"]), runs, name, method, why, "thresholds",
            id="thresholds.fan_in_controlled.bn_prediction"))
    return out


WHICH_FAN_IN = (
    "Which fan-in result answers the question: the controlled width sweep. It changes one layer's fan-in W and "
    "nothing else (same depth, same fan-out, same neighbours), so its slope is the effect of width on |m| and on "
    "the τ a layer needs. The pooled fan-in law (section 3) compares different layers of one network: a wide layer "
    "there also sits at another depth, feeds a different fan-out and sees gradients shaped by the layers after it "
    "(the last layers get the largest |m| whatever their width), so its slope mixes width with depth and fan-out "
    "and can differ in sign from the controlled one. Both use the right unit: the pooled fit has one point per "
    "layer (seeds averaged), the sweep one point per (width, seed) run.")


def _figure_width_sweep(points: pd.DataFrame, slopes: pd.DataFrame, path):
    from . import figures as F

    @F.instrument
    def draw(points, path):
        if F._empty(points):
            return None
        import seaborn as sns

        with F._figure(path, ncols=2, width=9, height=3.4) as (fig, axes):
            for ax, (col, lab) in zip(axes[0], (("abs_m_q50", "median |m| of the layer after W"),
                                                ("flip_ratio", "flip ratio of that layer")), strict=True):
                sns.scatterplot(data=points, x="fan_in", y=col, hue="dataset", style="seed", ax=ax)
                ax.set_xscale("log")
                if (points[col] > 0).all():
                    ax.set_yscale("log")
                ax.set_xlabel("width W (its fan-in)")
                ax.set_ylabel(lab)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=6)
        return path

    return draw(points, path)


def _figure_policies(comp: pd.DataFrame, path):
    from . import figures as F

    @F.instrument
    def draw(comp, path):
        if F._empty(comp):
            return None
        with F._figure(path, width=7.5, height=0.5 + 0.45 * len(comp)) as (fig, axes):
            ax = axes[0][0]
            labels = [f"{r.variant} − {r.reference} ({r.comparison})" for r in comp.itertuples()]
            y = np.arange(len(comp))
            lo = (comp["diff_mean"] - comp["ci_lo"]).fillna(0)
            hi = (comp["ci_hi"] - comp["diff_mean"]).fillna(0)
            ax.errorbar(100 * comp["diff_mean"], y, xerr=[100 * lo, 100 * hi], fmt="o", capsize=2)
            ax.axvline(0, color="0.5", lw=0.8)
            ax.set_yticks(y, labels, fontsize=6)
            ax.set_xlabel("paired difference in validation accuracy (percentage points)")
        return path

    return draw(comp, path)


def frame_layers(run) -> list[str]:
    """The run's binary layers in model order (the layers table's row order)."""
    from .frames import frame

    lay = frame(run, "layers")
    return list(lay["layer"]) if "layer" in lay else []


def section(runs, w, opt=None):
    """The report section (``bnn_probe.reports.render.Section``) and its verdicts, or ``(None, [])`` when the runs
    hold neither a per-layer policy nor a width sweep. ``w``: the report's writer (``.csv(name, df)``, ``.fig(name)``);
    ``opt``: the report options (``window``)."""
    from .render import Section

    window = getattr(opt, "window", 0.5)
    runs = list(runs)
    has_policy = any(policy_of(r) in PER_LAYER_POLICIES for r in runs if not is_tau_sweep(r))
    sweep = width_sweep(runs, window)
    if not has_policy and sweep.points.empty:
        return None, []
    sec = Section("3b. Per-layer threshold policies compared", anchor="threshold-policies")
    verdicts: list[stats.Verdict] = []
    if has_policy:
        res = policy_comparison(runs, window)
        verdicts = res.verdicts
        sec.text("Runs grouped by (dataset, model, variant), seeds as replicates. Accuracy: final validation "
                 "accuracy, mean and 95 % t-interval over seeds. Spread: coefficient of variation of the per-layer "
                 "flip ratios (mean over the last part of each run) across layers, std/mean. Frozen: share of "
                 "weights that never flipped. Verdicts: each per-layer policy against a global τ, paired over the "
                 "seeds both ran (same initial weights and batches), Holm-corrected over the policies: once "
                 "against the best global τ (by mean accuracy; choosing it on the same data favours the global "
                 "policy), once against the global τ whose network-mean flip ratio is closest to the policy's — "
                 "the comparison that isolates how flips are allocated across layers from how many there are.")
        sec.verdicts(res.verdicts)
        sec.figure(_figure_policies(res.comparisons, w.fig("policies")),
                   "Paired accuracy differences against the best and the flip-rate-matched global τ "
                   "(Bonferroni intervals)")
        sec.table(res.comparisons, "Paired comparisons (Holm-adjusted p)",
                  w.csv("threshold_policies_paired", res.comparisons))
        sec.table(res.table, "Threshold policies: accuracy and spread of flip ratios",
                  w.csv("threshold_policies", res.table))
        sec.table(res.frozen, "Frozen weights and flip ratio per layer",
                  w.csv("threshold_policies_layers", res.frozen))
    if not sweep.points.empty:
        sv = sweep_verdicts(sweep)
        verdicts = verdicts + sv
        sec.text("Controlled width sweep: the layer after the varied hidden width W (fan-in W; depth and fan-out "
                 "fixed), at least 3 seeds. Slopes of log median |m| and log flip ratio against log W, intercept per "
                 f"seed, t-interval. The batch-norm argument predicts −0.5 for |m|; equivalence is tested by TOST "
                 f"with margin ±{BN_MARGIN:g}.")
        sec.text(WHICH_FAN_IN)
        sec.verdicts(sv)
        sec.figure(_figure_width_sweep(sweep.points, sweep.slopes, w.fig("width_sweep")),
                   "Controlled width sweep: |m| and flip ratio of the layer after width W")
        sec.table(sweep.slopes, "Width sweep slopes", w.csv("width_sweep_slopes", sweep.slopes))
        sec.table(sweep.points, "Width sweep points", w.csv("width_sweep_points", sweep.points))
    return sec, verdicts


def markdown(res: PolicyComparison) -> str:
    """The section as Markdown (tables and verdicts); numbers only formatted, not computed."""
    lines = ["## Threshold policies", ""]
    if res.table.empty:
        return "\n".join([*lines, "No runs to compare.", ""])
    lines += ["| dataset | model | variant | seeds | val. accuracy (95 % CI) | CV of layer flip ratios (95 % CI) |",
              "|---|---|---|---|---|---|"]
    for r in res.table.itertuples(index=False):
        acc = _ci(r.val_acc_mean, r.val_acc_lo, r.val_acc_hi, 100, " %")
        spread = _ci(r.cv_mean, r.cv_lo, r.cv_hi, 1, "")
        lines.append(f"| {r.dataset} | {r.model} | {r.variant} | {r.n_seeds} | {acc} | {spread} |")
    lines += ["", "Share of frozen weights (never flipped) per layer, mean over seeds:", "",
              "| dataset | model | variant | layer | fan-in | frozen | flip ratio |", "|---|---|---|---|---|---|---|"]
    for r in res.frozen.itertuples(index=False):
        lines.append(f"| {r.dataset} | {r.model} | {r.variant} | {r.layer} | {r.fan_in} | "
                     f"{_pct(r.frozen_share)} | {r.flip_ratio:.3g} |")
    lines += [""]
    for v in res.verdicts:
        iv = "" if v.interval is None else f", 95 % CI [{v.interval[0]:+.4f}, {v.interval[1]:+.4f}]"
        st = "n/a" if v.statistic is None else f"{v.statistic:+.4f}"
        lines.append(f"- **{v.verdict}** — {v.claim}: {v.statistic_name} {st}{iv}, n = {v.n} runs. {v.reason}.")
    return "\n".join([*lines, ""])


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(float(x)) else f"{100 * float(x):.1f} %"


def _ci(m: float, lo: float, hi: float, k: float, unit: str) -> str:
    if not math.isfinite(m):
        return "n/a"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{k * m:.3g}{unit}"
    return f"{k * m:.3g}{unit} [{k * lo:.3g}, {k * hi:.3g}]"
