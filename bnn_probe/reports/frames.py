"""Uniform access to a run's tables and metadata for the analyses.

The analyses accept anything shaped like :class:`bnn_probe.runlog.Run` (``.meta``, ``.name``, ``.layers``, ``.steps``,
``.train``, ``.tracked``, ``.events``, ``.hists``, ``.snapshots``, ``.weight_flips``); a missing table is an empty
DataFrame, so every analysis can skip quietly when its data is absent.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

PI_FLOOR = math.exp(-9)
QUANTILES = ("q05", "q25", "q50", "q75", "q95")
QUANTILE_P = (0.05, 0.25, 0.50, 0.75, 0.95)
BOP_FAMILIES = ("bop", "bop2nd")


def frame(run, name: str) -> pd.DataFrame:
    """The table ``name`` of ``run``, or an empty DataFrame when the run has none."""
    df = getattr(run, name, None)
    if callable(df):
        df = df()
    if df is None:
        return pd.DataFrame()
    return df


def run_name(run) -> str:
    name = getattr(run, "name", None)
    if name:
        return str(name)
    path = getattr(run, "path", None)
    return str(path) if path is not None else "run"


def meta(run) -> dict:
    return dict(getattr(run, "meta", None) or {})


def config(run) -> dict:
    return dict(meta(run).get("config") or {})


def family(run) -> str:
    fam = meta(run).get("family")
    if fam:
        return str(fam)
    layers = frame(run, "layers")
    if "family" in layers and len(layers):
        return str(layers["family"].iloc[0])
    return "unknown"


def status(run) -> str:
    return str(getattr(run, "status", None) or meta(run).get("status") or "unknown")


def pi_metric(flip_ratio) -> np.ndarray:
    """The paper's log-scale flip metric pi = log(flip_ratio + e^-9)."""
    return np.log(np.asarray(flip_ratio, dtype=float) + PI_FLOOR)


def analysis_window(steps: pd.DataFrame, window: float) -> pd.DataFrame:
    """The rows of the last ``window`` fraction of the steps (window=1: all steps)."""
    if steps.empty or "step" not in steps:
        return steps
    lo, hi = steps["step"].min(), steps["step"].max()
    cut = hi - window * (hi - lo)
    return steps[steps["step"] >= cut] if window < 1 else steps


def network_flips(steps: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    """Whole-network flip ratio per step: sum of flips over layers / sum of their weights."""
    if steps.empty:
        return pd.DataFrame(columns=["step", "flips", "n_weights", "flip_ratio"])
    df = steps[["step", "layer", "flips"]]
    if "n_weights" in layers and len(layers):
        nw = layers.set_index("layer")["n_weights"]
        df = df.assign(n_weights=df["layer"].map(nw).astype(float))
    else:  # fall back on flips / flip_ratio
        df = df.assign(n_weights=steps["flips"] / steps["flip_ratio"].replace(0, np.nan))
    g = df.groupby("step", sort=True)[["flips", "n_weights"]].sum()
    g["flip_ratio"] = g["flips"] / g["n_weights"]
    return g.reset_index()


def bin_steps(df: pd.DataFrame, max_points: int, by: list[str] | None = None, value_cols: list[str] | None = None,
              step_col: str = "step") -> pd.DataFrame:
    """Downsample a per-step table to at most ``max_points`` step bins (mean per bin) for plotting."""
    if df.empty:
        return df
    by = by or []
    value_cols = value_cols or [c for c in df.columns if c not in by and c != step_col]
    smin, smax = df[step_col].min(), df[step_col].max()
    nsteps = df[step_col].nunique()
    if nsteps <= max_points:
        return df[[*by, step_col, *value_cols]]
    width = (smax - smin + 1) / max_points
    b = ((df[step_col] - smin) // width).astype(np.int64)
    out = df.assign(_bin=b).groupby([*by, "_bin"], sort=True)[[step_col, *value_cols]].mean().reset_index()
    return out.drop(columns="_bin")


def concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    """Concatenate ``frames``; an empty DataFrame with ``columns`` when there are none."""
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
