"""Does ``--threshold-policy normalized`` even out per-layer flip ratios? (docs/findings.md, "normalized").

For each (dataset, model, γ/τ setting): one calibration run with the global τ (seed 9, not among the test seeds)
fixes the multiple k = τ / geomean_l(mean |m|_l) (mean |m| per layer from the probe's ``abs_m_mean``, averaged over
the run), so that ``normalized`` works at the network's own typical margin; then seeds 0, 1, 2 train with the global
τ and with ``normalized`` at that k. Reported per seed: the coefficient of variation of the per-layer flip ratios
over the whole run (window 1.0), global vs normalized, their ratio, and the final validation accuracies.

    python benchmarks/normalized_cv.py --out runs/normalized_cv            # all four configurations
    python benchmarks/normalized_cv.py --out runs/normalized_cv --only digits-default
    python benchmarks/normalized_cv.py --out runs/normalized_cv --scale flow   # τ_l = k·mean|m| − ρ·RMS step

With ``--scale flow`` the multiple is matched as k = geomean_l((τ + ρ·δ_l)/mean|m|_l) on the calibration run (δ_l the
RMS step of m of the tracked weights, ρ = 0.583: τ + ō in units of mean |m|), and the runs are ``normalized-flow-s*``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

import bnn_probe
from bnn_probe.reports.threshold_policies import cv_reduction
from bnn_probe.reports.training import runs_table
from bnn_probe.train import TrainConfig, train

CONFIGS = {
    "digits-default": dict(dataset="digits", model="mlp", widths=(2048, 64, 1024), gamma=None, threshold=None,
                           epochs=10),
    "digits-g1e-3": dict(dataset="digits", model="mlp", widths=(2048, 64, 1024), gamma=1e-3, threshold=1e-6,
                         epochs=10),
    "mnist1d-default": dict(dataset="mnist1d", model="cnn1d", widths=(), gamma=None, threshold=None, epochs=4),
    "mnist1d-g1e-3": dict(dataset="mnist1d", model="cnn1d", widths=(), gamma=1e-3, threshold=1e-6, epochs=4),
}
CALIBRATION_SEED = 9
SEEDS = (0, 1, 2)


def matched_multiple(run, tau: float) -> float:
    """k = τ / geometric mean over layers of the layer's mean |m| (``abs_m_mean``, averaged over the run)."""
    st = run.steps
    scale = st.groupby("layer")["abs_m_mean"].mean()
    return float(tau / math.exp(np.log(scale[scale > 0]).mean()))


def flow_multiple(run, tau: float) -> float:
    """k = geometric mean over layers of (τ + ρ·δ_l)/mean|m|_l, δ_l the RMS tracked step of m over the run."""
    from bnn_probe.optim.thresholds import OVERSHOOT_RHO
    from bnn_probe.reports.thresholds import layer_table

    st = run.steps
    scale = st.groupby("layer")["abs_m_mean"].mean()
    step = layer_table([run], window=1.0).set_index("layer")["step_size_rms"]
    k = (tau + OVERSHOOT_RHO * step.reindex(scale.index)) / scale
    return float(math.exp(np.log(k[(k > 0) & np.isfinite(k)]).mean()))


def _train(cfg: TrainConfig, out: Path, policy=None) -> Path:
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()).get("status") == "finished":
        return out
    return train(cfg, out, progress=False, overwrite=True, checkpoint_every=0, policy=policy)


def run_config(name: str, spec: dict, root: Path, scale: str = "mean_abs", balance: float = 0.0,
               seeds: tuple[int, ...] = SEEDS, every: int = 10) -> pd.DataFrame:
    from bnn_probe.optim.thresholds import normalized

    base = TrainConfig(batch_size=64, hist_every=0, snapshot_every=0, track=16, **spec)
    tau = base.resolved().threshold
    cal = bnn_probe.load_run(_train(replace(base, seed=CALIBRATION_SEED), root / name / "calibration"))
    k = flow_multiple(cal, tau) if scale == "flow" else matched_multiple(cal, tau)
    tag = ("normalized" if scale == "mean_abs" else f"normalized-{scale}") + (f"-b{balance:g}" if balance else "") \
        + (f"-e{every}" if every != 10 else "")
    glob, norm = [], []
    for s in seeds:
        glob.append(bnn_probe.load_run(_train(replace(base, seed=s), root / name / f"global-s{s}")))
        cfg = replace(base, seed=s, threshold_policy="normalized", threshold_multiple=k)
        pol = normalized(k, initial_threshold=tau, scale=scale, balance=balance, every=every)
        norm.append(bnn_probe.load_run(_train(cfg, root / name / f"{tag}-s{s}", pol)))
    red = cv_reduction(glob, norm, window=1.0).rename(columns={"cv_from_report": "cv_normalized"})
    acc = runs_table(glob + norm)[0].set_index("run")["final_val_accuracy"]
    red.insert(0, "config", name)
    red.insert(1, "multiple", k)
    red["acc_global"] = [acc.get(n, math.nan) for n in red["run_global"]]
    red["acc_normalized"] = [acc.get(n, math.nan) for n in red["run_from_report"]]
    return red


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--only", default=None, help="one configuration: " + ", ".join(CONFIGS))
    ap.add_argument("--epochs", type=int, default=None, help="override the configuration's epochs")
    ap.add_argument("--scale", default="mean_abs", choices=["mean_abs", "flow"], help="normalized policy's scale")
    ap.add_argument("--balance", type=float, default=0.0, help="normalized policy's allocation feedback gain κ")
    ap.add_argument("--every", type=int, default=10, help="normalized policy's host-update cadence (steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="test seeds (default 0 1 2)")
    a = ap.parse_args(argv)
    names = [a.only] if a.only else list(CONFIGS)
    frames = [run_config(n, {**CONFIGS[n], **({"epochs": a.epochs} if a.epochs else {})}, a.out, a.scale,
                         a.balance, tuple(a.seeds), a.every) for n in names]
    df = pd.concat(frames, ignore_index=True)
    pd.set_option("display.width", 200)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    a.out.mkdir(parents=True, exist_ok=True)
    suffix = "".join([
        "" if a.scale == "mean_abs" else f"_{a.scale}", f"_b{a.balance:g}" if a.balance else "",
        f"_e{a.every}" if a.every != 10 else "", f"_{a.only}" if a.only else "",
        "" if tuple(a.seeds) == SEEDS else "_s" + "-".join(map(str, a.seeds))])
    df.to_csv(a.out / f"normalized_cv{suffix}.csv", index=False)


if __name__ == "__main__":
    main()
