"""The run directory format, version 2: table names, columns and their dtypes, histogram bin edges.

Version 2 (this one) replaced the post-step Bop counts ``flip_now`` and ``settled`` (equal to ``flips`` and
``above_threshold`` once Bop has acted) by the pre-decision margin (``margin_exceed_*``, ``margin_q*``), and added
``c2i_corr`` and the ``step_size`` of tracked weights and flip events. Version-1 logs stay readable: their missing
columns read as NaN, their extra columns are kept.

docs/runlog-format.md documents the same; docs/quantities.md defines every quantity.

Example:
    >>> empty_frame("steps").columns[:3].tolist()
    ['step', 'layer', 'flips']
"""

from __future__ import annotations

import math

import pandas as pd

__all__ = [
    "FORMAT", "SCHEMA_VERSION", "QUANTILES", "MARGIN_LADDER", "MARGIN_LADDER_NAMES", "MARGIN_EXCEED",
    "MARGIN_QUANTILES", "MARGIN_Q", "TABLES", "PART_TABLES", "HIST_EDGES", "HIST_QUANTITIES",
    "empty_frame", "conform", "q_cols",
]

FORMAT = "bnn-probe-run"
SCHEMA_VERSION = 2
QUANTILES = (0.05, 0.25, 0.50, 0.75, 0.95)
# the pre-decision margin w_{t−1}·m_t: exceedance counts at k·τ (k = MARGIN_LADDER) and upper quantiles
MARGIN_LADDER: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
MARGIN_LADDER_NAMES: tuple[str, ...] = ("1_8", "1_4", "1_2", "1", "2", "4", "8")
MARGIN_EXCEED: tuple[str, ...] = tuple(f"margin_exceed_{k}" for k in MARGIN_LADDER_NAMES)
MARGIN_QUANTILES: tuple[float, ...] = (0.50, 0.90, 0.99, 0.999)
MARGIN_Q: tuple[str, ...] = ("margin_q50", "margin_q90", "margin_q99", "margin_q999")


def q_cols(prefix: str) -> list[str]:
    return [f"{prefix}_q{round(q * 100):02d}" for q in QUANTILES]


_F = "float64"
_I = "int64"
_NI = "Int64"  # nullable
_S = "string"

LAYERS: dict[str, str] = {
    "layer": _S, "fan_in": _I, "fan_out": _I, "n_weights": _I, "shape": _S, "module_type": _S, "group": _I,
    "family": _S, "gamma": _F, "threshold": _F, "lr": _F, "sigma": _F, "optimizer": _S, "layer_index": _I,
    "binarizer": _S, "source": _S,
}

STEPS: dict[str, str] = {
    "step": _I, "layer": _S, "flips": _I, "flip_ratio": _F, "flip_ratio_running": _F, "c2i": _F, "c2i_corr": _F,
    "c2i_diff": _I,
    "nonfinite_grads": _I, "sign_hash": _NI, "gamma": _F, "threshold": _F, "lr": _F, "sigma": _F,
    # Bop family (NaN for latent layers)
    "above_threshold": _F, "crossings_up": _F, "crossings_down": _F, **{c: _F for c in MARGIN_EXCEED},
    "abs_m_mean": _F, **{c: _F for c in q_cols("abs_m")}, **{c: _F for c in q_cols("wm")},
    **{c: _F for c in MARGIN_Q},
    # latent only (NaN for Bop family)
    "abs_w_mean": _F, **{c: _F for c in q_cols("abs_w")}, "at_clip": _F, "adam_step_q50": _F, "adam_step_q95": _F,
}

TRACKED: dict[str, str] = {"step": _I, "layer": _S, "index": _I, "sign": "int8", "inertia": _F, "step_size": _F}
EVENTS: dict[str, str] = {"step": _I, "layer": _S, "index": _I, "inertia_before": _F,
                          "steps_since_last_flip": _NI, "step_size": _F}
HISTS: dict[str, str] = {"step": _I, "layer": _S, "quantity": _S, "bin": _I, "left": _F, "right": _F,
                         "count": _I}
SNAPSHOTS: dict[str, str] = {"step": _I, "layer": _S, "n_weights": _I, "signs": "object"}
WEIGHT_FLIPS: dict[str, str] = {"step": _I, "layer": _S, "flips_per_weight": _I, "n": _I}
TRAIN: dict[str, str] = {"step": _NI, "epoch": _NI, "name": _S, "value": _F}
SCALES: dict[str, str] = {"step": _I, "layer": _S, "scale_mean": _F, "scale_min": _F, "scale_max": _F,
                          "binarizer": _S}

TABLES: dict[str, dict[str, str]] = {
    "layers": LAYERS, "steps": STEPS, "tracked": TRACKED, "events": EVENTS, "hists": HISTS,
    "snapshots": SNAPSHOTS, "weight_flips": WEIGHT_FLIPS, "train": TRAIN, "scales": SCALES,
}
PART_TABLES = ("steps", "tracked", "events", "hists", "snapshots", "train", "scales")


def _log_edges(lo_exp: int, hi_exp: int, per_decade: int) -> list[float]:
    n = (hi_exp - lo_exp) * per_decade
    return [10 ** (lo_exp + k / per_decade) for k in range(n + 1)]


_REL = _log_edges(-3, 3, 5)
HIST_EDGES: dict[str, list[float]] = {
    "abs_m_rel": _REL,                                    # |m|/τ
    "wm_rel": [-e for e in reversed(_REL)] + [0.0] + _REL,  # w·m/τ, signed log bins
    "abs_m": _log_edges(-12, 0, 2),                        # |m|
    "abs_w": _log_edges(-6, 1, 5),                          # |w̃|
}
HIST_QUANTITIES = tuple(HIST_EDGES)


def bin_edges(quantity: str, b: int) -> tuple[float, float]:
    e = HIST_EDGES[quantity]
    return (e[b - 1] if b > 0 else -math.inf, e[b] if b < len(e) else math.inf)


def empty_frame(table: str) -> pd.DataFrame:
    """An empty DataFrame with the documented columns and dtypes of ``table``."""
    return pd.DataFrame({c: pd.Series(dtype=d) for c, d in TABLES[table].items()})


def conform(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """Documented columns first, in order, with their dtypes (missing ones filled with NA); extra columns kept."""
    spec = TABLES[table]
    out = {}
    for c, d in spec.items():
        if c in df.columns:
            s = df[c]
            try:
                out[c] = s.astype(d) if str(s.dtype) != d else s
            except (TypeError, ValueError):
                out[c] = s
        else:
            dd = _NI if d == _I else d
            out[c] = pd.Series([pd.NA if dd in (_NI, _S, "object") else math.nan] * len(df), dtype=dd,
                               index=df.index)
    for c in df.columns:
        if c not in spec:
            out[c] = df[c]
    return pd.DataFrame(out, index=df.index)
