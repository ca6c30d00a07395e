"""Section 1 of a report: the runs, their training curves and flip ratios over time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .frames import (
    QUANTILES,
    bin_steps,
    concat,
    config,
    family,
    frame,
    meta,
    network_flips,
    pi_metric,
    run_name,
    status,
)

MAX_POINTS = 400

# Accuracy metrics a run may log (``probe.log(name=value)``), searched in this order; the first one present is used.
HELD_OUT_ACCURACY = ("val_accuracy", "val_acc", "valid_accuracy", "validation_accuracy", "test_accuracy", "test_acc",
                     "accuracy", "acc", "top1", "val_top1", "test_top1")
TRAIN_ACCURACY = ("train_accuracy", "train_acc", "train_top1")
# optimizer class names (of the binary parameters' group) → the name the runs table gives a latent-weight optimizer
_LATENT_NAMES = {"adam": "latent-adam", "adamw": "latent-adamw", "sgd": "latent-sgd", "decoupledsgd": "latent-sgd"}


@dataclass
class TrainingResult:
    runs: pd.DataFrame
    curves: pd.DataFrame  # run, step, metric, value (downsampled)
    network_flips: pd.DataFrame  # run, family, step, flip_ratio, pi (downsampled)
    layer_flips: pd.DataFrame  # run, layer, fan_in, step, flip_ratio, pi (downsampled)
    warnings: list[str] = field(default_factory=list)
    # run, group, layer, fan_in, step, threshold: runs whose per-layer τ changes during training (calibrated policy)
    thresholds: pd.DataFrame = field(default_factory=pd.DataFrame)
    # run, group, layer, fan_in, step, abs_w_q05 … abs_w_q95: latent-weight magnitudes (inertia) over time
    latent_inertia: pd.DataFrame = field(default_factory=pd.DataFrame)


def _final(train: pd.DataFrame, col: str) -> float:
    if train.empty or not col or col not in train:
        return math.nan
    s = train[["step", col]].dropna().sort_values("step")
    return float(s[col].iloc[-1]) if len(s) else math.nan


def accuracy_metric(train: pd.DataFrame, names: tuple[str, ...] = HELD_OUT_ACCURACY) -> str:
    """The first of ``names`` the run's train table holds with a value ("" when none)."""
    for n in names:
        if n in train and train[n].notna().any():
            return n
    return ""


def optimizer_label(run) -> str:
    """What optimizes the binary weights: ``bop``, ``bop2nd``, ``latent-adam``, ``latent-sgd``, … (never the
    wrapper class, e.g. ``CaseOptimizer``): the training config's ``optimizer`` when it has one, else the class of
    the first parameter group's optimizer (the binary one) named by the run's family."""
    m, c = meta(run), config(run)
    if isinstance(c.get("optimizer"), str) and c["optimizer"]:
        return str(c["optimizer"])
    opt = m.get("optimizer") or {}
    groups = opt.get("groups") or [{}]
    cls = str((groups[0] or {}).get("optimizer") or opt.get("class") or "")
    fam = family(run)
    if fam == "bop2nd" or "2nd" in cls.lower():
        return "bop2nd"
    if fam == "bop" or cls.lower() == "bop":
        return "bop"
    if not cls:
        return fam
    return _LATENT_NAMES.get(cls.lower(), f"latent-{cls.lower()}" if fam == "latent" else cls)


def threshold_label(run, steps: pd.DataFrame, fallback: float):
    """The threshold in force at the run's last logged step: one number, or a ``lo–hi`` range when its layers
    have different τ (per-layer policies); the configured τ when the steps table has no threshold column."""
    taus = []
    if not steps.empty and "threshold" in steps:
        last = steps[steps["step"] == steps["step"].max()]
        taus = [float(t) for t in last["threshold"].dropna()]
    if not taus:
        groups = (meta(run).get("optimizer") or {}).get("groups") or []
        taus = [float(g["threshold"]) for g in groups if isinstance(g, dict) and g.get("threshold") is not None]
    if not taus:
        return fallback
    lo, hi = min(taus), max(taus)
    return lo if math.isclose(lo, hi, rel_tol=1e-9, abs_tol=0) else f"{lo:.2g}–{hi:.2g}"


def runs_table(runs) -> tuple[pd.DataFrame, list[str]]:
    """One row per run: optimizer, hyperparameters, model, dataset, steps, final accuracies, status.

    ``optimizer`` is :func:`optimizer_label`; ``threshold`` is :func:`threshold_label` (a range for per-layer τ);
    ``final_val_accuracy`` is the last value of the first held-out accuracy metric found among
    :data:`HELD_OUT_ACCURACY` (its name in ``accuracy_metric``), ``final_train_accuracy`` likewise among
    :data:`TRAIN_ACCURACY`."""
    rows, warnings = [], []
    for run in runs:
        m, c = meta(run), config(run)
        steps = frame(run, "steps")
        train = frame(run, "train")
        last = m.get("last_step")
        if last is None and not steps.empty:
            last = int(steps["step"].max())
        st = status(run)
        held_out = accuracy_metric(train)
        latent = family(run) == "latent"  # no γ, no τ (the config's defaults do not apply)
        groups = (m.get("optimizer") or {}).get("groups") or [{}]
        g0 = groups[0] if groups else {}
        rows.append({
            "run": run_name(run),
            "status": st,
            "family": family(run),
            "optimizer": optimizer_label(run),
            "model": (m.get("model") or {}).get("class", c.get("model", "")),
            "dataset": c.get("dataset", ""),
            "gamma": math.nan if latent else c.get("gamma", g0.get("gamma", math.nan)),
            "threshold": math.nan if latent else threshold_label(run, steps,
                                                                 c.get("threshold", g0.get("threshold", math.nan))),
            "lr": c.get("lr", g0.get("lr", math.nan)),
            "seed": c.get("seed", ""),
            "tag": m.get("tag") or "",
            "steps": last if last is not None else 0,
            "n_binary_weights": (m.get("model") or {}).get("n_binary_weights", math.nan),
            "final_train_accuracy": _final(train, accuracy_metric(train, TRAIN_ACCURACY)),
            "final_val_accuracy": _final(train, held_out),
            "accuracy_metric": held_out,
        })
        if st != "finished":
            warnings.append(f"run {run_name(run)} did not finish (status: {st}); it is analysed up to step {last}.")
        if (w := nonfinite_warning(run_name(run), steps)) is not None:
            warnings.append(w)
    return pd.DataFrame(rows), warnings


def run_group(run) -> str:
    """The group a run is drawn with in faceted figures: its tag (the study that made it), else its family."""
    return str(meta(run).get("tag") or family(run))


def nonfinite_warning(name: str, steps: pd.DataFrame) -> str | None:
    """A warning when the run's steps table counts non-finite gradient entries (``nonfinite_grads`` > 0): where
    they were, how many, and what the optimizer did with them; None when there were none."""
    if steps.empty or "nonfinite_grads" not in steps:
        return None
    n = pd.to_numeric(steps["nonfinite_grads"], errors="coerce").fillna(0)
    if not (n > 0).any():
        return None
    bad = steps[n > 0]
    per_layer = n[n > 0].groupby(bad["layer"].astype(str)).sum().sort_values(ascending=False)
    where = ", ".join(f"{layer} ({int(k)})" for layer, k in per_layer.head(3).items())
    more = f" and {len(per_layer) - 3} more layers" if len(per_layer) > 3 else ""
    return (f"run {name} had {int(n.sum())} non-finite gradient entries (NaN or ±inf) in {int((n > 0).sum())} "
            f"logged layer-steps, first at step {int(bad['step'].min())}: {where}{more}. Bop and Bop2ndOrder skip "
            "such entries (their momentum is left unchanged); other optimizers may have stored NaN. Check the loss "
            "and the learning rates.")


def analyse_training(runs, max_points: int = MAX_POINTS) -> TrainingResult:
    table, warnings = runs_table(runs)
    curves, net, lay, taus, lat = [], [], [], [], []
    wq = [f"abs_w_{q}" for q in QUANTILES]
    for run in runs:
        name = run_name(run)
        group = run_group(run)
        train = frame(run, "train")
        metric_cols = [c for c in train.columns
                       if c not in ("step", "epoch") and pd.api.types.is_numeric_dtype(train[c])]
        if not train.empty and metric_cols and "step" in train:
            t = bin_steps(train[["step", *metric_cols]], max_points)
            long = t.melt(id_vars="step", value_vars=metric_cols, var_name="metric", value_name="value").dropna()
            curves.append(long.assign(run=name, group=group))
        steps = frame(run, "steps")
        if steps.empty:
            continue
        layers = frame(run, "layers")
        nf = network_flips(steps, layers)
        nf = bin_steps(nf[["step", "flip_ratio"]], max_points)
        net.append(nf.assign(run=name, family=family(run), group=group, pi=pi_metric(nf["flip_ratio"])))
        lf = bin_steps(steps[["step", "layer", "flip_ratio"]], max_points, by=["layer"])
        if "fan_in" in layers:
            lf = lf.assign(fan_in=lf["layer"].map(layers.set_index("layer")["fan_in"]))
        else:
            lf = lf.assign(fan_in=np.nan)
        lay.append(lf.assign(run=name, group=group, pi=pi_metric(lf["flip_ratio"])))
        fan = layers.set_index("layer")["fan_in"] if "fan_in" in layers else pd.Series(dtype=float)
        if "threshold" in steps and steps.groupby("layer")["threshold"].nunique().max() > 1:
            t = bin_steps(steps[["step", "layer", "threshold"]].dropna(), max_points, by=["layer"])
            taus.append(t.assign(run=name, group=group, fan_in=t["layer"].map(fan)))
        if family(run) == "latent" and set(wq) <= set(steps.columns) and steps[wq[2]].notna().any():
            t = bin_steps(steps[["step", "layer", *wq]].dropna(subset=[wq[2]]), max_points, by=["layer"])
            lat.append(t.assign(run=name, group=group, fan_in=t["layer"].map(fan)))
    cat = concat
    return TrainingResult(
        runs=table,
        curves=cat(curves, ["step", "metric", "value", "run", "group"]),
        network_flips=cat(net, ["step", "flip_ratio", "run", "family", "group", "pi"]),
        layer_flips=cat(lay, ["step", "layer", "flip_ratio", "fan_in", "run", "group", "pi"]),
        warnings=warnings,
        thresholds=cat(taus, ["step", "layer", "threshold", "run", "group", "fan_in"]),
        latent_inertia=cat(lat, ["step", "layer", *wq, "run", "group", "fan_in"]),
    )
