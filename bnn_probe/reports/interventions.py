"""The magnitude-reset experiment (verdict ``inertia.magnitude_reset``, figure ``figures/magnitude_reset.png``).

Design (Helwegen et al. 2019, Sec. 3, made interventional): two runs with the same seed — identical until step T —
form a pair named in their config, ``{"intervention": {"pair", "role": "control" | "reset", "step": T, "mode"}}``.
After step T the reset arm replaces the inertia of every binary weight and keeps its sign
(:func:`bnn_probe.interventions.reset_inertia`), so both arms hold the same binary network at T.

* Inertia view: the magnitudes only delay sign changes, so the reset costs a transient (a burst of flips — or a
  freeze when the reset raises small magnitudes — after T) and the arms' accuracy and loss meet again.
* Approximation view: w̃ is the model, so throwing its magnitudes away does lasting damage.

Statistics, per condition (the pairs' shared options, mode and T), one pair per seed (the unit of replication):

* final accuracy of an arm = mean validation accuracy over its last :data:`FINAL_EVALS` evaluations after T;
  d_s = final(reset) − final(control), likewise for the validation loss;
* TOST for equivalence of the mean paired difference to 0 within ±:data:`MARGIN` (α = 0.05: the 90 % t-interval
  lies inside (−δ, δ)); lasting damage when the 90 % interval lies below −δ (one-sided 5 % test of d < −δ);
* flip burst: e_t = flip ratio(reset) − flip ratio(control) of the whole network at step t > T;
  ``excess_flips`` = Σ e_t over the burst window (the first quarter of the logged steps after T, at least 10): the
  extra flips per weight (negative: a freeze; a sum over logged steps, so every step with the runner's
  ``probe_every = 1``); ``peak_excess`` = the e_t of largest |e_t| in the window;
  ``decay_steps`` = the half-decay time: steps after T until the 5-step moving average of |e_t| first falls to
  half its maximum (searched after the maximum, over the rest of the run; NaN: not within the run).
  A burst "was there" when the 95 % t-interval of ``excess_flips`` over seeds excludes 0.

Decision rule: < 3 pairs → inconclusive; lasting damage → not supported; equivalent and a burst → supported;
otherwise inconclusive (equivalent without a measurable burst: the reset did not perturb the dynamics, so it cannot
tell the views apart; neither equivalent nor damaged beyond δ: undecided).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns

from . import figures as F
from . import stats
from .frames import config, frame, network_flips, run_name
from .stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict

__all__ = ["MARGIN", "FINAL_EVALS", "MIN_SEEDS", "condition_key", "final_value", "t_interval", "reset_pairs",
           "ResetAnalysis", "analyse_resets", "reset_verdicts", "section"]

MARGIN = 0.02  # accuracy: two percentage points
FINAL_EVALS = 3
MIN_SEEDS = 3
BURST_MIN_STEPS = 10
SMOOTH_STEPS = 5
_IGNORED = {"seed", "tag", "pair", "pair_role", "intervention", "extra", "device", "amp", "compile", "probe_every",
            "hist_every", "snapshot_every", "track", "quantile_every", "latent_eval", "data_dir"}


def condition_key(run) -> str:
    """The run's options that define an experimental condition (seed, names, probe cadence and device dropped)."""
    c = config(run)
    keep = {k: v for k, v in sorted(c.items()) if k not in _IGNORED}
    return ", ".join(f"{k}={v}" for k, v in keep.items() if v is not None)


def condition_label(run) -> str:
    """A short readable name of the condition: dataset, model, optimizer."""
    c = config(run)
    return "/".join(str(c.get(k)) for k in ("dataset", "model", "optimizer") if c.get(k) is not None) or "run"


def final_value(train: pd.DataFrame, col: str, after: int | None = None, k: int = FINAL_EVALS) -> float:
    """Mean of the last ``k`` logged values of ``col`` (only those at steps > ``after``); NaN when there are none."""
    if train is None or train.empty or col not in train or "step" not in train:
        return math.nan
    s = train[["step", col]].dropna().sort_values("step", kind="stable")
    if after is not None:
        s = s[s["step"] > after]
    return float(s[col].tail(k).mean()) if len(s) else math.nan


def t_interval(values, level: float) -> tuple[float, float, float, int]:
    """:func:`bnn_probe.reports.stats.t_interval` with the number of finite values: (mean, lo, hi, n)."""
    v = np.asarray(values, dtype=float)
    return (*stats.t_interval(v, level), int(np.isfinite(v).sum()))


@dataclass
class ResetPair:
    name: str
    control: object
    reset: object
    step: int
    mode: str
    seed: int
    condition: str
    label: str


def reset_pairs(runs) -> tuple[list[ResetPair], list[str]]:
    """Pairs of runs named by ``config["intervention"]["pair"]`` with one control and one reset arm."""
    groups: dict[str, dict[str, list]] = {}
    for r in runs:
        iv = config(r).get("intervention")
        if isinstance(iv, dict) and iv.get("pair") and iv.get("role") in ("control", "reset"):
            groups.setdefault(str(iv["pair"]), {"control": [], "reset": []})[iv["role"]].append(r)
    pairs, notes = [], []
    for name, g in groups.items():
        if len(g["control"]) != 1 or len(g["reset"]) != 1:
            notes.append(f"intervention pair {name!r} has {len(g['control'])} control and {len(g['reset'])} reset "
                         "run(s), not one of each: left out")
            continue
        c, r = g["control"][0], g["reset"][0]
        ivc, ivr = config(c)["intervention"], config(r)["intervention"]
        if ivc.get("step") != ivr.get("step") or ivc.get("mode") != ivr.get("mode") or \
                condition_key(c) != condition_key(r) or config(c).get("seed") != config(r).get("seed"):
            notes.append(f"intervention pair {name!r}: the arms differ in more than their role (options, seed, step "
                         "or mode): left out")
            continue
        cond = f"{condition_key(r)}, mode={ivr.get('mode')}, step={ivr.get('step')}"
        pairs.append(ResetPair(name, c, r, int(ivr["step"]), str(ivr["mode"]), int(config(r).get("seed") or 0), cond,
                               f"{condition_label(r)} {ivr.get('mode')} T={ivr.get('step')}"))
    return pairs, notes


def _burst(pair: ResetPair) -> tuple[float, float, float, pd.DataFrame]:
    """excess_flips, peak_excess, decay_steps and the per-step flip ratios of both arms."""
    nets = []
    for arm, run in (("control", pair.control), ("reset", pair.reset)):
        net = network_flips(frame(run, "steps"), frame(run, "layers"))
        nets.append(net[["step", "flip_ratio"]].rename(columns={"flip_ratio": arm}))
    both = nets[0].merge(nets[1], on="step", how="inner").sort_values("step")
    after = both[both["step"] > pair.step]
    if after.empty:
        return math.nan, math.nan, math.nan, both
    e_all = (after["reset"] - after["control"]).to_numpy(float)
    e = e_all[:max(BURST_MIN_STEPS, len(after) // 4)]
    total = float(e.sum())
    peak = float(e[np.argmax(np.abs(e))]) if e.size else math.nan
    k = min(SMOOTH_STEPS, e_all.size)
    smooth = np.convolve(np.abs(e_all), np.ones(k) / k, mode="valid")  # smooth[i]: mean |e| over steps T+1+i…
    top = int(np.argmax(smooth))
    below = np.nonzero(smooth[top:] <= smooth[top] / 2)[0] if smooth[top] > 0 else np.array([], dtype=int)
    decay = float(top + below[0] + 1) if below.size else math.nan
    return total, peak, decay, both


@dataclass
class ResetAnalysis:
    pairs: pd.DataFrame  # one row per pair
    curves: pd.DataFrame  # long: label, pair, seed, arm, step, quantity, value
    notes: list[str] = field(default_factory=list)


def analyse_resets(runs) -> ResetAnalysis:
    """Per pair: final accuracy/loss of both arms and their differences, and the flip burst after T."""
    pairs, notes = reset_pairs(runs)
    rows, curves = [], []
    seen: set[tuple[str, int]] = set()
    for p in pairs:
        if (p.condition, p.seed) in seen:
            notes.append(f"intervention pair {p.name!r} repeats seed {p.seed} of its condition: left out")
            continue
        seen.add((p.condition, p.seed))
        tr_c, tr_r = frame(p.control, "train"), frame(p.reset, "train")
        acc_c, acc_r = final_value(tr_c, "val_accuracy", p.step), final_value(tr_r, "val_accuracy", p.step)
        loss_c, loss_r = final_value(tr_c, "val_loss", p.step), final_value(tr_r, "val_loss", p.step)
        excess, peak, decay, both = _burst(p)
        rows.append({"condition": p.condition, "label": p.label, "pair": p.name, "seed": p.seed, "step": p.step,
                     "mode": p.mode, "control": run_name(p.control), "reset": run_name(p.reset),
                     "final_accuracy_control": acc_c, "final_accuracy_reset": acc_r, "accuracy_diff": acc_r - acc_c,
                     "final_loss_control": loss_c, "final_loss_reset": loss_r, "loss_diff": loss_r - loss_c,
                     "excess_flips": excess, "peak_excess": peak, "decay_steps": decay})
        for arm, tr in (("control", tr_c), ("reset", tr_r)):
            for q in ("val_accuracy", "val_loss"):
                if q in tr:
                    s = tr[["step", q]].dropna()
                    curves.append(pd.DataFrame({"label": p.label, "pair": p.name, "seed": p.seed, "arm": arm,
                                                "reset_step": p.step, "step": s["step"].to_numpy(), "quantity": q,
                                                "value": s[q].to_numpy(float)}))
            span = max(BURST_MIN_STEPS, (int(both["step"].max()) - p.step) // 4) if len(both) else 0
            near = both[both["step"] > p.step - span]
            curves.append(pd.DataFrame({"label": p.label, "pair": p.name, "seed": p.seed, "arm": arm,
                                        "reset_step": p.step, "step": near["step"].to_numpy(), "quantity": "flip_ratio",
                                        "value": near[arm].to_numpy(float)}))
    cols = ["label", "pair", "seed", "arm", "step", "quantity", "value", "reset_step"]
    return ResetAnalysis(pd.DataFrame(rows), pd.concat(curves, ignore_index=True) if curves else
                         pd.DataFrame(columns=cols), notes)


def reset_verdicts(table: pd.DataFrame, margin: float = MARGIN, min_seeds: int = MIN_SEEDS) -> list[Verdict]:
    """One ``inertia.magnitude_reset`` verdict per condition (module docstring: the decision rule)."""
    out = []
    if table is None or table.empty:
        return out
    for cond, g in table.groupby("condition", sort=False):
        m, lo, hi, n = t_interval(g["accuracy_diff"], 0.90)
        lm, llo, lhi, _ = t_interval(g["loss_diff"], 0.90)
        bm, blo, bhi, _ = t_interval(g["excess_flips"], 0.95)
        burst = math.isfinite(blo) and (blo > 0 or bhi < 0)
        equivalent = math.isfinite(lo) and lo > -margin and hi < margin
        damage = math.isfinite(hi) and hi < -margin
        label = str(g["label"].iloc[0])
        decays = ", ".join("—" if math.isnan(d) else f"{d:.0f}" for d in g["decay_steps"])
        facts = (f"final accuracy reset − control {m:+.4f} (90 % CI [{lo:+.4f}, {hi:+.4f}]), loss {lm:+.4f} "
                 f"([{llo:+.4f}, {lhi:+.4f}]); excess flips per weight after T {bm:+.3g} (95 % CI [{blo:+.3g}, "
                 f"{bhi:+.3g}]); half-decay of the flip-ratio difference per seed: {decays} steps (—: not within "
                 "the run)")
        if n < min_seeds:
            verdict, reason = INCONCLUSIVE, f"{n} seed(s) < {min_seeds}: {facts}"
        elif damage:
            verdict, reason = NOT_SUPPORTED, f"lasting damage beyond −{margin:g}: {facts}"
        elif equivalent and burst:
            verdict, reason = SUPPORTED, f"transient: equivalent within ±{margin:g} (TOST, α = 0.05) after a " \
                                         f"{'burst' if bm > 0 else 'freeze'} of flips: {facts}"
        elif equivalent:
            verdict, reason = INCONCLUSIVE, f"equivalent within ±{margin:g}, but the reset did not measurably " \
                                            f"change flipping: {facts}"
        else:
            verdict, reason = INCONCLUSIVE, f"neither equivalent within ±{margin:g} nor damaged beyond it: {facts}"
        out.append(Verdict(
            claim=f"{label}: resetting the latent magnitudes / momenta at T with signs kept costs only a transient "
                  "(inertia view), not lasting damage (approximation view)",
            verdict=verdict, statistic=m, interval=t_interval(g["accuracy_diff"], 0.95)[1:3], n=n,
            runs=[*g["control"].tolist(), *g["reset"].tolist()],
            statistic_name="final accuracy reset − control (mean over seeds)",
            method=f"paired over seeds; interval: 95 % t-interval; the decision uses the 90 % t-interval (in the "
                   f"reason) = TOST with margin ±{margin:g} at α = 0.05; lasting damage when the 90 % interval lies "
                   f"below −{margin:g}; burst: 95 % t-interval of the excess flips after T "
                   f"excludes 0; condition: {cond}",
            reason=reason, section="inertia", id="inertia.magnitude_reset"))
    return out


@F.instrument
def figure(curves: pd.DataFrame, path: Path) -> Path | None:
    """Validation accuracy, loss and flip ratio around T of both arms, one line per seed (draws, computes nothing)."""
    if F._empty(curves):
        return None
    labels = list(dict.fromkeys(curves["label"]))[:3]
    qs = ("val_accuracy", "val_loss", "flip_ratio")
    with F._figure(path, ncols=3, nrows=len(labels), width=10.5, height=3.0 * len(labels)) as (fig, axes):
        for i, lab in enumerate(labels):
            for ax, q in zip(axes[i], qs, strict=True):
                sub = curves[(curves["label"] == lab) & (curves["quantity"] == q)]
                if sub.empty:
                    continue
                sns.lineplot(data=sub, x="step", y="value", hue="arm", units="seed", ax=ax, linewidth=0.8,
                             legend=i == 0 and q == "flip_ratio", **F.RAW)
                ax.set_title(f"{lab}: {q}", fontsize=8)
                ax.set_ylabel("")
                ax.axvline(float(sub["reset_step"].iloc[0]), color="0.4", linestyle="--", linewidth=0.8)
                if q == "flip_ratio":
                    ax.set_yscale("symlog", linthresh=1e-5)
                    ax.set_ylim(bottom=0)
    return path


def section(runs, w, opt):
    """The report part (None when no run belongs to an intervention pair)."""
    from .render import Section

    res = analyse_resets(runs)
    if res.pairs.empty and not res.notes:
        return None, []
    verdicts = reset_verdicts(res.pairs)
    s = Section("Magnitude reset: is |w̃| (or m) inertia or part of the model?", anchor="magnitude-reset")
    s.text("Two runs with the same seed branch at step T: the reset arm replaces the inertia of every binary weight "
           "(latent: |w̃| ← the layer's mean |w̃| or |w̃| permuted in the layer; Bop: m ← 0, or |m| set to the layer "
           "mean or permuted, sign kept), the control arm does nothing; the binary network is the same at T. The "
           "inertia view (Helwegen et al. 2019) predicts a transient; the approximation view lasting damage. "
           f"Final = mean of the last {FINAL_EVALS} evaluations after T; unit: the seed.")
    s.verdicts(verdicts)
    for n in res.notes:
        s.text(n)
    s.figure(figure(res.curves, w.fig("magnitude_reset")),
             "Validation accuracy and loss of both arms, and the whole-network flip ratio around T (one line per "
             "seed)")
    if not res.pairs.empty:
        s.table(res.pairs.drop(columns=["condition"]), "Magnitude-reset pairs",
                w.csv("magnitude_reset", res.pairs))
        w.csv("magnitude_reset_curves", res.curves)
    return s, verdicts
