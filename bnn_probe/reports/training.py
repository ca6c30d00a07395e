"""Section 1 of a report: the runs, their training curves and flip ratios over time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .frames import bin_steps, concat, config, family, frame, meta, network_flips, pi_metric, run_name, status

MAX_POINTS = 400


@dataclass
class TrainingResult:
    runs: pd.DataFrame
    curves: pd.DataFrame  # run, step, metric, value (downsampled)
    network_flips: pd.DataFrame  # run, family, step, flip_ratio, pi (downsampled)
    layer_flips: pd.DataFrame  # run, layer, fan_in, step, flip_ratio, pi (downsampled)
    warnings: list[str] = field(default_factory=list)


def _final(train: pd.DataFrame, col: str) -> float:
    if train.empty or col not in train:
        return math.nan
    s = train[["step", col]].dropna().sort_values("step")
    return float(s[col].iloc[-1]) if len(s) else math.nan


def runs_table(runs) -> tuple[pd.DataFrame, list[str]]:
    """One row per run: optimizer, hyperparameters, model, dataset, steps, final accuracies, status."""
    rows, warnings = [], []
    for run in runs:
        m, c = meta(run), config(run)
        steps = frame(run, "steps")
        train = frame(run, "train")
        last = m.get("last_step")
        if last is None and not steps.empty:
            last = int(steps["step"].max())
        st = status(run)
        groups = (m.get("optimizer") or {}).get("groups") or [{}]
        g0 = groups[0] if groups else {}
        rows.append({
            "run": run_name(run),
            "status": st,
            "family": family(run),
            "optimizer": (m.get("optimizer") or {}).get("class", c.get("optimizer", "")),
            "model": (m.get("model") or {}).get("class", c.get("model", "")),
            "dataset": c.get("dataset", ""),
            "gamma": c.get("gamma", g0.get("gamma", math.nan)),
            "threshold": c.get("threshold", g0.get("threshold", math.nan)),
            "lr": c.get("lr", g0.get("lr", math.nan)),
            "seed": c.get("seed", ""),
            "tag": m.get("tag") or "",
            "steps": last if last is not None else 0,
            "n_binary_weights": (m.get("model") or {}).get("n_binary_weights", math.nan),
            "final_train_accuracy": _final(train, "train_accuracy"),
            "final_val_accuracy": _final(train, "val_accuracy"),
        })
        if st != "finished":
            warnings.append(f"run {run_name(run)} did not finish (status: {st}); it is analysed up to step {last}.")
        if (w := nonfinite_warning(run_name(run), steps)) is not None:
            warnings.append(w)
    return pd.DataFrame(rows), warnings


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
    curves, net, lay = [], [], []
    for run in runs:
        name = run_name(run)
        train = frame(run, "train")
        metric_cols = [c for c in train.columns
                       if c not in ("step", "epoch") and pd.api.types.is_numeric_dtype(train[c])]
        if not train.empty and metric_cols and "step" in train:
            t = bin_steps(train[["step", *metric_cols]], max_points)
            long = t.melt(id_vars="step", value_vars=metric_cols, var_name="metric", value_name="value").dropna()
            curves.append(long.assign(run=name))
        steps = frame(run, "steps")
        if steps.empty:
            continue
        layers = frame(run, "layers")
        nf = network_flips(steps, layers)
        nf = bin_steps(nf[["step", "flip_ratio"]], max_points)
        net.append(nf.assign(run=name, family=family(run), pi=pi_metric(nf["flip_ratio"])))
        lf = bin_steps(steps[["step", "layer", "flip_ratio"]], max_points, by=["layer"])
        if "fan_in" in layers:
            lf = lf.assign(fan_in=lf["layer"].map(layers.set_index("layer")["fan_in"]))
        else:
            lf = lf.assign(fan_in=np.nan)
        lay.append(lf.assign(run=name, pi=pi_metric(lf["flip_ratio"])))
    cat = concat
    return TrainingResult(
        runs=table,
        curves=cat(curves, ["step", "metric", "value", "run"]),
        network_flips=cat(net, ["step", "flip_ratio", "run", "family", "pi"]),
        layer_flips=cat(lay, ["step", "layer", "flip_ratio", "fan_in", "run", "pi"]),
        warnings=warnings,
    )
