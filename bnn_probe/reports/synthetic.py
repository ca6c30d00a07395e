"""Synthetic run logs whose right answers are known, for tests and demonstrations of the reports.

:func:`make_run` returns an object shaped like :class:`bnn_probe.runlog.Run` (same attributes and columns as
docs/runlog-format.md) generated from a chosen ground truth: how |m| scales with fan-in, whether inertia lowers
the flip probability, whether two runs share one binary trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import norm as _norm

from ..runlog.schema import MARGIN_EXCEED, MARGIN_LADDER
from .frames import QUANTILE_P, QUANTILES

_Z = {q: z for q, z in zip(QUANTILES, (-1.6449, -0.6745, 0.0, 0.6745, 1.6449), strict=True)}


@dataclass
class SyntheticRun:
    meta: dict
    name: str
    layers: pd.DataFrame
    steps: pd.DataFrame
    train: pd.DataFrame = field(default_factory=pd.DataFrame)
    tracked: pd.DataFrame = field(default_factory=pd.DataFrame)
    events: pd.DataFrame = field(default_factory=pd.DataFrame)
    hists: pd.DataFrame = field(default_factory=pd.DataFrame)
    snapshots: pd.DataFrame = field(default_factory=pd.DataFrame)
    weight_flips: pd.DataFrame = field(default_factory=pd.DataFrame)
    path: str = ""

    @property
    def status(self) -> str:
        return self.meta.get("status", "finished")

    @property
    def finished(self) -> bool:
        return self.status == "finished"


DEFAULT_LAYERS = (("fc1.weight", 64, 4096), ("fc2.weight", 256, 16384), ("fc3.weight", 1024, 32768),
                  ("fc4.weight", 4096, 40960))


def make_run(name: str = "run", family: str = "bop", layers=DEFAULT_LAYERS, n_steps: int = 200,
             threshold: float = 1e-6, gamma: float = 1e-3, lr: float = 1e-3, m_slope: float = -0.5,
             m_scale: float | None = None, m_spread: float = 1.0, noise: float = 0.05, flip_base: float = 0.05,
             inertia_effect: float = 1.0, n_tracked: int = 64, trajectory_seed: int | None = None,
             diverge_at: int | None = None, schedule: str | None = None, snapshot_every: int = 50,
             status: str = "finished", seed: int = 0, tag: str = "", config: dict | None = None,
             margin_ladder: bool = True) -> SyntheticRun:
    """A synthetic run.

    * median |m| of a layer = m_scale · (fan_in/64)^m_slope (default m_scale = 2τ), times log-normal noise
      ``noise`` per step; |m| is log-normal with log-sd ``m_spread`` (its quantiles are logged).
    * flip ratio per (step, layer) = flip_base · P(|m| > τ): the tail-matching model of the threshold
      recommendation holds exactly, so wide layers flip less when m_slope < 0. With ``margin_ladder`` the
      pre-decision margin's exceedance counts are written as their expectation n · flip_base · P(|m| > k·τ) for the
      ladder k = 1/8 … 8 (so the rate a layer would have at any τ' is flip_base · P(|m| > τ'), known exactly);
      without it the log looks like a version-1 log (no margin columns).
    * tracked weights: a persistent inertia per weight ~ Exponential(1) (times small per-step noise); each step the
      weight flips with probability 0.2·exp(-inertia_effect·inertia)·(1+inertia_effect)/2 (inertia_effect=0:
      flips independent of inertia).
    * sign_hash and snapshots are drawn from ``trajectory_seed`` (default: seed): runs sharing it have identical
      binary trajectories, up to ``diverge_at`` (the step from which this run's hashes differ).
    * schedule "step": lr/γ ×0.1 at half of the run, and flip ratio ×0.3 with it.
    """
    rng = np.random.default_rng(seed)
    traj = np.random.default_rng(seed if trajectory_seed is None else trajectory_seed)
    lay = pd.DataFrame([{"layer": n, "fan_in": fi, "fan_out": nw // fi, "n_weights": nw, "shape": [nw // fi, fi],
                         "module_type": "BinaryLinear", "group": i, "family": family, "gamma": gamma,
                         "threshold": threshold, "lr": lr, "sigma": np.nan}
                        for i, (n, fi, nw) in enumerate(layers)])
    L, S = len(lay), n_steps
    step = np.repeat(np.arange(1, S + 1), L)
    li = np.tile(np.arange(L), S)
    fan = lay["fan_in"].to_numpy(float)[li]
    nw = lay["n_weights"].to_numpy()[li]
    hp = np.ones(S * L)
    if schedule == "step":
        hp = np.where(step > S // 2, 0.1, 1.0)
    if m_scale is None:
        m_scale = 2 * threshold if threshold > 0 else 1e-4
    med = m_scale * (fan / 64.0) ** m_slope * np.exp(rng.normal(0, noise, S * L))
    tail = _norm.sf((np.log(threshold) - np.log(med)) / m_spread) if threshold > 0 else np.ones(S * L)
    fr = np.clip(flip_base * tail * np.where(hp < 1, 0.3, 1.0), 0, 1)
    flips = rng.binomial(nw, fr)
    hashes = traj.integers(0, 2**62, size=S * L)
    if diverge_at is not None:
        later = step >= diverge_at
        hashes[later] = rng.integers(0, 2**62, size=int(later.sum()))
    steps = pd.DataFrame({"step": step, "layer": lay["layer"].to_numpy()[li], "flips": flips,
                          "flip_ratio": flips / nw, "flip_ratio_running": np.nan, "c2i": np.nan,
                          "nonfinite_grads": 0, "sign_hash": hashes, "gamma": gamma * hp if family != "latent" else
                          np.nan, "threshold": threshold if family != "latent" else np.nan,
                          "lr": lr * hp if family == "latent" else np.nan, "sigma": np.nan})
    pre = "abs_m" if family != "latent" else "abs_w"
    for q in QUANTILES:
        steps[f"{pre}_{q}"] = med * np.exp(m_spread * _Z[q])
    steps[f"{pre}_mean"] = med * np.exp(m_spread**2 / 2)
    if family != "latent":
        for q, p in zip(QUANTILES, QUANTILE_P, strict=True):
            steps[f"wm_{q}"] = med * (2 * p - 1)
        if margin_ladder and threshold > 0:
            for k, c in zip(MARGIN_LADDER, MARGIN_EXCEED, strict=True):
                steps[c] = nw * flip_base * _norm.sf((np.log(k * threshold) - np.log(med)) / m_spread) * \
                    np.where(hp < 1, 0.3, 1.0)
    # tracked weights: one row per (step, layer, index)
    T = n_tracked
    n_rows = S * L * T
    t_step = np.repeat(np.arange(1, S + 1), L * T)
    t_layer = np.tile(np.repeat(np.arange(L), T), S)
    t_index = np.tile(np.arange(T), S * L)
    inertia = np.tile(rng.exponential(1.0, L * T), S) * np.exp(rng.normal(0, 0.1, n_rows))
    p_next = np.clip(0.1 * np.exp(-inertia_effect * inertia) * (1 + inertia_effect), 0, 1)
    # the flip at step s+1 of weight (l, i) depends on its inertia at step s
    flip_at = np.zeros(n_rows, dtype=bool)
    idx = np.arange(n_rows)
    nxt = idx + L * T  # same weight, next step
    ok = t_step < S
    flip_at[nxt[ok]] = rng.random(int(ok.sum())) < p_next[ok]
    flip_grid = flip_at.reshape(S, L * T)
    signs = np.where(np.cumsum(flip_grid, axis=0) % 2 == 0, 1, -1).astype(np.int8).reshape(-1)
    tracked = pd.DataFrame({"step": t_step, "layer": lay["layer"].to_numpy()[t_layer], "index": t_index,
                            "sign": signs, "inertia": inertia * (threshold if family != "latent" else 0.1)})
    # weight_flips: distribution of flips per weight at the last step
    wf = []
    for _, r in lay.iterrows():
        lam = fr[li == _].mean() * S
        per_w = rng.poisson(lam, int(r["n_weights"]))
        vc = pd.Series(per_w).value_counts()
        wf.append(pd.DataFrame({"step": S, "layer": r["layer"], "flips_per_weight": vc.index.to_numpy(),
                                "n": vc.to_numpy()}))
    weight_flips = pd.concat(wf, ignore_index=True)
    snaps = []
    for s in range(snapshot_every, S + 1, snapshot_every):
        for _, r in lay.iterrows():
            bits = traj.integers(0, 2, int(r["n_weights"]), dtype=np.uint8)
            if diverge_at is not None and s >= diverge_at:
                bits = bits.copy()
                bits[: max(1, int(r["n_weights"]) // 100)] ^= 1
            snaps.append({"step": s, "layer": r["layer"], "n_weights": int(r["n_weights"]),
                          "signs": np.packbits(bits).tobytes()})
    snapshots = pd.DataFrame(snaps, columns=["step", "layer", "n_weights", "signs"])
    tr_steps = np.arange(10, S + 1, 10)
    acc = 1 - 0.9 * np.exp(-tr_steps / max(S / 3, 1))
    train = pd.DataFrame({"step": tr_steps, "epoch": tr_steps // 50, "train_loss": 2.3 * (1 - acc) + 0.1,
                          "train_accuracy": acc, "val_accuracy": acc - 0.02})
    opt_class = {"bop": "Bop", "bop2nd": "Bop2ndOrder", "latent": "Adam"}[family]
    cfg = {"model": "mlp", "dataset": "digits", "optimizer": opt_class.lower(), "gamma": gamma,
           "threshold": threshold, "lr": lr, "seed": seed}
    cfg.update(config or {})
    meta = {"format": "bnn-probe-run", "schema_version": 2 if margin_ladder else 1, "status": status, "family": family,
            "optimizer": {"class": opt_class, "groups": [{"index": 0, "gamma": gamma, "threshold": threshold}]},
            "model": {"class": "BinaryMLP", "n_binary_weights": int(lay["n_weights"].sum())},
            "config": cfg, "tag": tag, "versions": {"bnn_probe": "synthetic"}, "last_step": S,
            "bnn_probe_version": "0.1.0", "torch_version": "synthetic", "python_version": "3"}
    return SyntheticRun(meta=meta, name=name, layers=lay, steps=steps, train=train, tracked=tracked,
                        snapshots=snapshots, weight_flips=weight_flips, path=f"<synthetic:{name}>")


def write_run(run: SyntheticRun, path, parts: int = 2, tensorboard: bool = False):
    """Write ``run`` as a run directory with the real run-log writer (:class:`bnn_probe.runlog.RunWriter`).

    Per-step tables are split into ``parts`` Parquet parts, as a probe's flushes would. Returns the path.
    """
    from pathlib import Path

    from ..runlog import RunWriter

    w = RunWriter(path, tensorboard=tensorboard)
    try:
        w.write_table("layers", run.layers.assign(shape=run.layers["shape"].astype(str)))
        for table in ("steps", "tracked", "events", "hists", "snapshots"):
            df = getattr(run, table)
            if df is None or df.empty:
                continue
            edges = np.linspace(df["step"].min(), df["step"].max() + 1, parts + 1)
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                w.append(table, df[(df["step"] >= lo) & (df["step"] < hi)])
        if not run.train.empty:
            cols = [c for c in run.train.columns if c not in ("step", "epoch")]
            w.append("train", run.train.melt(id_vars=["step", "epoch"], value_vars=cols, var_name="name",
                                             value_name="value"))
        if not run.weight_flips.empty:
            w.write_table("weight_flips", run.weight_flips)
        w.write_meta(run.meta)
    finally:
        w.close()
    return Path(path)
