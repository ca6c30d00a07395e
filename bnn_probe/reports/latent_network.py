"""The latent network against the binary one (verdict ``inertia.latent_network``, ``figures/latent_network.png``).

Latent-weight runs trained with ``latent_eval`` log, every epoch, the validation accuracy and loss of the latent
network (w̃/α in place of sign(w̃), α = mean|w̃| per layer, batch-norm statistics re-estimated; see
:mod:`bnn_probe.latent_network`) next to the binary network's, and the approximation error
‖w̃ − α·sign(w̃)‖/‖w̃‖ per layer.

* Approximation view (w̃ is the model; sign(w̃) approximates it): the latent network is at least as accurate as the
  binary one, and the approximation error shrinks as training makes the binary network a better approximation.
* Inertia view (Helwegen et al. 2019): |w̃| is inertia, not part of a model: nothing makes the latent network the
  better classifier, and nothing pulls the magnitudes together.

Statistics, per condition (the runs' shared options), one run per seed (the unit of replication):

* d_s = final latent accuracy − final binary accuracy (finals: mean of the last :data:`FINAL_EVALS` evaluations),
  mean over seeds with a 90 % t-interval (one-sided 5 % tests against the margin δ = :data:`MARGIN`);
* Δe_s = final − first logged approximation error (mean over the binary layers), 95 % t-interval.

Decision rule for the claim "the latent weights are not a model that the binary network approximates":
< 3 seeds → inconclusive; **supported** when the latent network is less accurate beyond the margin (the 90 %
interval of d lies below −δ) or the approximation error grows (the 95 % interval of Δe lies above 0);
**not supported** when the latent network is non-inferior (the 90 % interval of d lies above −δ) and the error
shrinks (the 95 % interval of Δe lies below 0) — both predictions of the approximation view hold; otherwise
inconclusive. The Bop family has no latent network (its m is a gradient average, not a weight): its runs are
named and skipped.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import seaborn as sns

from . import figures as F
from .frames import config, family, frame, run_name
from .interventions import FINAL_EVALS, MARGIN, MIN_SEEDS, condition_key, condition_label, final_value, t_interval
from .stats import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict

__all__ = ["analyse_latent", "latent_verdicts", "figure", "section"]

_ERR = "approx_error/"


def _eligible(run) -> bool:
    tr = frame(run, "train")
    iv = config(run).get("intervention")
    reset_arm = isinstance(iv, dict) and iv.get("role") == "reset"
    return {"latent_val_accuracy", "val_accuracy", "step"} <= set(tr.columns) and not reset_arm


def _trajectory(run) -> int | None:
    """A fingerprint of the run's binary trajectory (every logged per-layer sign hash), None without hashes."""
    st = frame(run, "steps")
    if st.empty or "sign_hash" not in st or st["sign_hash"].isna().any():
        return None
    return hash(tuple(st.sort_values(["step", "layer"], kind="stable")["sign_hash"].astype("int64").tolist()))


def analyse_latent(runs) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(per-run table, long curves table, notes). Reset arms of magnitude-reset pairs are left out (perturbed);
    a second run of the same condition and seed (e.g. a control arm and a plain run), or with the same binary
    trajectory as a run already counted (e.g. the two runs of a Theorem-1 pair), is counted once."""
    rows, curves, notes, repeats = [], [], [], []
    seen: set[tuple[str, int]] = set()
    trajectories: set[int] = set()
    bop = [run_name(r) for r in runs if family(r) in ("bop", "bop2nd")]
    if bop:
        notes.append("Bop-family runs have no latent network (m is a moving average of gradients, not a weight the "
                     f"binary one approximates): {len(bop)} run(s) skipped.")
    for r in runs:
        if not _eligible(r):
            continue
        cond, seed = condition_key(r), int(config(r).get("seed") or 0)
        fp = _trajectory(r)
        if (cond, seed) in seen or (fp is not None and fp in trajectories):
            repeats.append(run_name(r))
            continue
        seen.add((cond, seed))
        if fp is not None:
            trajectories.add(fp)
        tr = frame(r, "train").sort_values("step", kind="stable")
        errs = [c for c in tr.columns if c.startswith(_ERR)]
        ev = tr[["step", "val_accuracy", "latent_val_accuracy", *errs]].dropna(subset=["latent_val_accuracy"])
        e = ev[errs].mean(axis=1) if errs else pd.Series(math.nan, index=ev.index)
        acc_b = final_value(tr, "val_accuracy")
        acc_l = final_value(tr, "latent_val_accuracy")
        rows.append({"condition": cond, "label": condition_label(r), "run": run_name(r), "seed": seed,
                     "final_accuracy_binary": acc_b, "final_accuracy_latent": acc_l, "accuracy_diff": acc_l - acc_b,
                     "approx_error_first": float(e.iloc[0]) if len(e) else math.nan,
                     "approx_error_final": float(e.iloc[-1]) if len(e) else math.nan,
                     "approx_error_change": float(e.iloc[-1] - e.iloc[0]) if len(e) else math.nan})
        lab = condition_label(r)
        for net, col in (("binary", "val_accuracy"), ("latent", "latent_val_accuracy")):
            curves.append(pd.DataFrame({"label": lab, "run": run_name(r), "seed": seed, "step": ev["step"].to_numpy(),
                                        "quantity": "val_accuracy", "series": net, "value": ev[col].to_numpy(float)}))
        for c in errs:
            curves.append(pd.DataFrame({"label": lab, "run": run_name(r), "seed": seed, "step": ev["step"].to_numpy(),
                                        "quantity": "approx_error", "series": c.removeprefix(_ERR),
                                        "value": ev[c].to_numpy(float)}))
    if repeats:
        notes.append(f"{len(repeats)} run(s) repeat a run above — the same options and seed (e.g. a control arm and "
                     f"a plain run) or the same binary trajectory (e.g. a Theorem-1 pair) — and are counted once: "
                     f"{', '.join(repeats)}")
    cols = ["label", "run", "seed", "step", "quantity", "series", "value"]
    return (pd.DataFrame(rows), pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=cols),
            notes)


def latent_verdicts(table: pd.DataFrame, margin: float = MARGIN, min_seeds: int = MIN_SEEDS) -> list[Verdict]:
    """One ``inertia.latent_network`` verdict per condition (module docstring: the decision rule)."""
    out = []
    if table is None or table.empty:
        return out
    for cond, g in table.groupby("condition", sort=False):
        m, lo, hi, n = t_interval(g["accuracy_diff"], 0.90)
        em, elo, ehi, _ = t_interval(g["approx_error_change"], 0.95)
        facts = (f"final accuracy latent − binary {m:+.4f} (90 % CI [{lo:+.4f}, {hi:+.4f}]); approximation error "
                 f"{g['approx_error_first'].mean():.3f} → {g['approx_error_final'].mean():.3f}, change {em:+.4f} "
                 f"(95 % CI [{elo:+.4f}, {ehi:+.4f}])")
        worse = math.isfinite(hi) and hi < -margin
        grows = math.isfinite(elo) and elo > 0
        noninferior = math.isfinite(lo) and lo > -margin
        shrinks = math.isfinite(ehi) and ehi < 0
        if n < min_seeds:
            verdict, reason = INCONCLUSIVE, f"{n} seed(s) < {min_seeds}: {facts}"
        elif worse or grows:
            what = " and ".join(x for x, ok in (("the latent network is less accurate beyond the margin", worse),
                                                ("the approximation error grows", grows)) if ok)
            verdict, reason = SUPPORTED, f"{what}: {facts}"
        elif noninferior and shrinks:
            verdict, reason = NOT_SUPPORTED, f"the latent network is at least as accurate (within −{margin:g}) and " \
                                             f"the approximation error shrinks, as the approximation view predicts: " \
                                             f"{facts}"
        else:
            verdict, reason = INCONCLUSIVE, f"neither view's prediction is met clearly: {facts}"
        out.append(Verdict(
            claim=f"{g['label'].iloc[0]}: the latent weights are not a real-valued model that the binary network "
                  "approximates (the latent network is not at least as accurate, or ‖w̃ − α·sign(w̃)‖/‖w̃‖ does not "
                  "shrink)",
            verdict=verdict, statistic=m, interval=t_interval(g["accuracy_diff"], 0.95)[1:3], n=n,
            runs=g["run"].tolist(), statistic_name="final accuracy latent − binary network (mean over seeds)",
            method=f"paired within runs, over seeds; interval: 95 % t-interval; the decision uses the 90 % t-interval "
                   f"(in the reason) against the margin {margin:g} (one-sided 5 % tests); approximation-error change "
                   "final − first, 95 % t-interval; condition: " + cond,
            reason=reason, section="inertia", id="inertia.latent_network"))
    return out


@F.instrument
def figure(curves: pd.DataFrame, path: Path) -> Path | None:
    """Accuracy of the binary and the latent network, and the approximation error per layer, over training."""
    if F._empty(curves):
        return None
    labels = list(dict.fromkeys(curves["label"]))[:3]
    with F._figure(path, ncols=2, nrows=len(labels), width=9.0, height=3.0 * len(labels)) as (fig, axes):
        for i, lab in enumerate(labels):
            for ax, q in zip(axes[i], ("val_accuracy", "approx_error"), strict=True):
                sub = curves[(curves["label"] == lab) & (curves["quantity"] == q)]
                if sub.empty:
                    continue
                sns.lineplot(data=sub, x="step", y="value", hue="series", units="run", ax=ax, linewidth=0.8,
                             legend=i == 0, **F.RAW)
                ax.set_title(f"{lab}: {'validation accuracy' if q == 'val_accuracy' else '‖w̃ − α·sign w̃‖/‖w̃‖'}",
                             fontsize=8)
                ax.set_ylabel("")
    return path


def section(runs, w, opt):
    """The report part (None when no run logged its latent network)."""
    from .render import Section

    table, curves, notes = analyse_latent(runs)
    if table.empty:
        return None, []
    verdicts = latent_verdicts(table)
    s = Section("The latent network: model or inertia?", anchor="latent-network")
    s.text("Every epoch the latent-weight runs evaluate the latent network — w̃/α (α = mean|w̃| per layer, the "
           "least-squares scale of α·sign(w̃) ≈ w̃) in place of sign(w̃), activations still binary, batch-norm "
           "statistics re-estimated on the training data — and log ‖w̃ − α·sign(w̃)‖/‖w̃‖ per layer. The "
           "approximation view predicts a latent network at least as accurate as the binary one and a shrinking "
           f"error; unit: the seed; final = mean of the last {FINAL_EVALS} evaluations.")
    s.verdicts(verdicts)
    for n in notes:
        s.text(n)
    s.figure(figure(curves, w.fig("latent_network")),
             "Validation accuracy of the binary and the latent network, and the approximation error per layer "
             "(one line per run)")
    s.table(table.drop(columns=["condition"]), "Latent against binary network, per run", w.csv("latent_network", table))
    w.csv("latent_network_curves", curves)
    return s, verdicts
