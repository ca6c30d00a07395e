"""Synthetic runs with known answers for the inertia experiments (tests and demonstrations).

* :func:`theorem1_group` — a Theorem-1 group (reference, rounding control, scaled runs) whose Hamming distances from
  the reference follow a chosen curve per C.
* :func:`hazard_run` — tracked weights whose flip probability does (or does not) depend on inertia in steps.
* :func:`bop_vs_latent_pair` — a Bop and a latent run from the same initial signs, flipping overlapping or
  independent sets of weights.

Tables have the columns of docs/runlog-format.md (``tracked.step_size``, ``steps.c2i``, ``snapshots.signs``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from .synthetic import SyntheticRun

LAYERS = (("fc1.weight", 64, 4096), ("fc2.weight", 256, 16384))


def _layers(family: str, layers=LAYERS) -> pd.DataFrame:
    return pd.DataFrame([{"layer": n, "fan_in": fi, "fan_out": nw // fi, "n_weights": nw, "shape": [nw // fi, fi],
                          "module_type": "BinaryLinear", "group": i, "family": family}
                         for i, (n, fi, nw) in enumerate(layers)])


def _run(name: str, family: str, seed: int, extra: dict, steps: pd.DataFrame, snapshots=None, tracked=None,
         layers=LAYERS, **cfg) -> SyntheticRun:
    config = {"model": "mlp", "dataset": "digits", "widths": [256], "seed": seed, "batch_norm": True,
              "optimizer": {"bop": "bop", "latent": "latent-sgd"}.get(family, family), "extra": extra, **cfg}
    nw = {n: w for n, _, w in layers}
    steps = steps.assign(flip_ratio=steps["flips"] / steps["layer"].map(nw))
    meta = {"format": "bnn-probe-run", "schema_version": 1, "status": "finished", "family": family,
            "config": config, "tag": "", "last_step": int(steps["step"].max()) if len(steps) else 0}
    return SyntheticRun(meta=meta, name=name, layers=_layers(family, layers), steps=steps,
                        snapshots=snapshots if snapshots is not None else pd.DataFrame(),
                        tracked=tracked if tracked is not None else pd.DataFrame(), path=f"<synthetic:{name}>")


def theorem1_group(seed: int, arm: str, fraction: Callable[[float, np.ndarray], np.ndarray],
                   cs=(3.0, 10.0, 100.0), rounding: bool = True, n_steps: int = 200,
                   snapshot_every: int = 10) -> list[SyntheticRun]:
    """Reference (C = 1), rounding control (C = 1, ``fraction(1, t)``) and scaled runs; run C differs from the
    reference in the first ⌊fraction(C, t)·n⌋ weights of each layer at snapshot t, and its sign hashes differ from
    the first step where that is positive."""
    rng = np.random.default_rng(1000 + seed)
    snap_steps = np.arange(snapshot_every, n_steps + 1, snapshot_every)
    ref_bits = {(s, n): rng.integers(0, 2, nw, dtype=np.uint8) for s in snap_steps for n, _, nw in LAYERS}
    steps_all = np.arange(1, n_steps + 1)
    ref_hash = rng.integers(0, 2**62, size=(n_steps, len(LAYERS)))
    out = []
    members = [(1.0, "reference")] + ([(1.0, "rounding")] if rounding else []) + [(c, "scaled") for c in cs]
    for c, role in members:
        frac = np.zeros(n_steps) if role == "reference" else np.broadcast_to(
            np.clip(fraction(c, steps_all.astype(float)), 0, 1), (n_steps,))
        hashes = ref_hash.copy()
        hashes[frac > 0] += 1
        steps = pd.DataFrame({"step": np.repeat(steps_all, len(LAYERS)),
                              "layer": np.tile([n for n, _, _ in LAYERS], n_steps),
                              "flips": 0, "sign_hash": hashes.reshape(-1)})
        snaps = []
        for s in snap_steps:
            for n, _, nw in LAYERS:
                bits = ref_bits[(s, n)].copy()
                k = int(frac[s - 1] * nw)
                bits[:k] ^= 1
                snaps.append({"step": int(s), "layer": n, "n_weights": nw, "signs": np.packbits(bits).tobytes()})
        extra = {"theorem1": {"C": c, "arm": arm, "role": role}}
        name = f"t1-{arm}-{role}-C{c:g}-s{seed}"
        out.append(_run(name, "latent", seed, extra, steps, pd.DataFrame(snaps), lr=0.1 * c, init_scale=0.1 * c,
                        clip=arm == "clipped"))
    return out


def hazard_run(seed: int, family: str = "latent", effect: bool = True, n_steps: int = 300, n_tracked: int = 64,
               base: float = 0.3, null_rate: float = 0.03) -> SyntheticRun:
    """Tracked weights with inertia x_t (in steps) ~ log-uniform on [1/8, 64], step size 0.01·(1 ± 10 %).

    With ``effect`` a weight flips at the next step with probability base·min(1, 1/x)²; without, with ``null_rate``
    whatever its inertia (flips independent of inertia).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for name, _, _ in LAYERS:
        x = np.exp(rng.uniform(np.log(1 / 8), np.log(64), (n_steps, n_tracked)))
        size = 0.01 * (1 + 0.1 * rng.uniform(-1, 1, (n_steps, n_tracked)))
        p = base * np.minimum(1, 1 / x) ** 2 if effect else np.full(x.shape, null_rate)
        flip_next = rng.random((n_steps, n_tracked)) < p  # flip between t and t+1 depends on x_t
        flips = np.vstack([np.zeros((1, n_tracked), bool), flip_next[:-1]])
        sign = np.where(np.cumsum(flips, axis=0) % 2 == 0, 1, -1).astype(np.int8)
        st = np.repeat(np.arange(1, n_steps + 1), n_tracked)
        rows.append(pd.DataFrame({"step": st, "layer": name, "index": np.tile(np.arange(n_tracked), n_steps),
                                  "sign": sign.reshape(-1), "inertia": (x * 0.01).reshape(-1),
                                  "step_size": size.reshape(-1)}))
    tracked = pd.concat(rows, ignore_index=True)
    steps = pd.DataFrame({"step": np.repeat(np.arange(1, n_steps + 1), len(LAYERS)),
                          "layer": np.tile([n for n, _, _ in LAYERS], n_steps), "flips": 0,
                          "sign_hash": rng.integers(0, 2**62, n_steps * len(LAYERS))})
    return _run(f"hazard-{family}-{'effect' if effect else 'null'}-s{seed}", family, seed, {}, steps,
                tracked=tracked)


def bop_vs_latent_pair(seed: int, overlap: bool = True, n_steps: int = 100, snapshot_every: int = 20,
                       rate: float = 0.002) -> tuple[SyntheticRun, SyntheticRun]:
    """Two runs from the same initial signs. Each changes a growing random set of weights (rate per step); with
    ``overlap`` the latent run changes the Bop run's weights first (half of its set), without it an independent set."""
    rng = np.random.default_rng(seed)
    snap_steps = np.arange(snapshot_every, n_steps + 1, snapshot_every)
    runs = {}
    sets = {}
    for n, _, nw in LAYERS:
        init = rng.integers(0, 2, nw, dtype=np.uint8)
        order_a = rng.permutation(nw)
        order_b = rng.permutation(nw)
        if overlap:
            half = order_a[: nw // 2]
            rest = np.setdiff1d(order_b, half, assume_unique=True)
            order_b = np.concatenate([half[::2], rest])[:nw]
        sets[n] = (init, order_a, order_b, nw)
    for role, fam in (("bop", "bop"), ("latent", "latent")):
        snaps, st = [], []
        for s in snap_steps:
            for n, (init, oa, ob, nw) in sets.items():
                k = int(min(1.0, rate * s) * nw)
                bits = init.copy()
                bits[(oa if role == "bop" else ob)[:k]] ^= 1
                snaps.append({"step": int(s), "layer": n, "n_weights": nw, "signs": np.packbits(bits).tobytes()})
                st.append({"step": int(s), "layer": n, "flips": 0, "c2i": 1 - k / nw, "sign_hash": int(s)})
        runs[role] = _run(f"bvl-{role}-s{seed}", fam, seed, {"bop_vs_latent": role}, pd.DataFrame(st),
                          pd.DataFrame(snaps))
    return runs["bop"], runs["latent"]


def real_valued_sgd_run(seed: int, n_steps: int = 300, n_tracked: int = 64, lr: float = 0.01) -> SyntheticRun:
    """A real-valued weight trained by SGD on noisy gradients, nothing binarised: w_t = w_{t−1} − lr·g_t with
    g_t ~ N(μ_i, 1) (μ_i ~ N(0, 0.3) per weight), w_0 ~ U(−0.1, 0.1). Its sign is read off and |w| logged as
    "inertia" — the approximation view's picture of a latent weight. "Larger |w|, fewer sign changes" holds here too,
    which is why the hazard verdict cannot tell the views apart."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, _, _ in LAYERS:
        mu = rng.normal(0, 0.3, n_tracked)
        w = rng.uniform(-0.1, 0.1, n_tracked)
        ws = np.empty((n_steps, n_tracked))
        steps_ = np.empty((n_steps, n_tracked))
        for t in range(n_steps):
            new = w - lr * (mu + rng.normal(0, 1, n_tracked))
            steps_[t] = np.abs(new - w)
            ws[t] = w = new
        st = np.repeat(np.arange(1, n_steps + 1), n_tracked)
        rows.append(pd.DataFrame({"step": st, "layer": name, "index": np.tile(np.arange(n_tracked), n_steps),
                                  "sign": np.where(ws >= 0, 1, -1).astype(np.int8).reshape(-1),
                                  "inertia": np.abs(ws).reshape(-1), "step_size": steps_.reshape(-1)}))
    steps = pd.DataFrame({"step": np.repeat(np.arange(1, n_steps + 1), len(LAYERS)),
                          "layer": np.tile([n for n, _, _ in LAYERS], n_steps), "flips": 0,
                          "sign_hash": rng.integers(0, 2**62, n_steps * len(LAYERS))})
    return _run(f"real-sgd-s{seed}", "latent", seed, {}, steps, tracked=pd.concat(rows, ignore_index=True))
