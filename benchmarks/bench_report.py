"""Benchmark of `bnn-probe report`: wall time and peak memory for logs of 10^4, 10^5 and 10^6 (step, layer) rows.

The logs are written by the real run-log writer (:class:`bnn_probe.runlog.RunWriter`, the probe's sink), one part
per 1000 steps as the probe's flushes would, with rows generated directly (no training). Each report is built in a
fresh subprocess; peak memory is that process's ru_maxrss (includes the Python/pandas/matplotlib baseline).

Log layout per size N: 10 binary layers (fan-in 16…8192) × N/10 steps in ``steps``; 64 tracked weights per layer
every 10 steps (6.4·N rows in ``tracked``), 16 flip events per layer every 10 steps, a sign snapshot every 1000
steps, histograms every 100 steps, training metrics every 50 steps, weight_flips at the end.

    python benchmarks/bench_report.py [--sizes 10000,100000,1000000] [--out /tmp/bench_report]

Goal: ≤ 30 s and ≤ 2 GB at 10^6 rows, growing no faster than linearly.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

LAYERS = 10
TRACK, TRACK_EVERY = 64, 10
EVENTS, EVENTS_EVERY = 16, 10
FLUSH = 1000
Q = ("q05", "q25", "q50", "q75", "q95")
Z = np.array([-1.6449, -0.6745, 0.0, 0.6745, 1.6449])


def write_log(path: Path, n_rows: int, seed: int = 0) -> None:
    from bnn_probe.runlog import HIST_EDGES, RunWriter

    rng = np.random.default_rng(seed)
    n_steps = n_rows // LAYERS
    fan = 2 ** np.arange(4, 4 + LAYERS)  # 16 … 8192
    nw = fan * 64
    names = np.array([f"block{i}.weight" for i in range(LAYERS)])
    tau, gamma = 1e-6, 1e-3
    w = RunWriter(path, tensorboard=False)
    w.write_table("layers", pd.DataFrame({
        "layer": names, "fan_in": fan, "fan_out": 64, "n_weights": nw, "shape": [f"[64, {f}]" for f in fan],
        "module_type": "BinaryLinear", "group": np.arange(LAYERS), "family": "bop", "gamma": gamma,
        "threshold": tau, "lr": np.nan, "sigma": np.nan}))
    edges = HIST_EDGES["abs_m_rel"]
    for s0 in range(1, n_steps + 1, FLUSH):
        steps = np.arange(s0, min(s0 + FLUSH, n_steps + 1))
        S = steps.size
        st = np.repeat(steps, LAYERS)
        li = np.tile(np.arange(LAYERS), S)
        med = 2 * tau * (fan[li] / 16.0) ** -0.5 * np.exp(rng.normal(0, 0.05, S * LAYERS))
        fr = np.clip(0.02 * (fan[li] / 16.0) ** -0.5, 0, 1)
        flips = rng.binomial(nw[li], fr)
        df = pd.DataFrame({"step": st, "layer": names[li], "flips": flips, "flip_ratio": flips / nw[li],
                           "flip_ratio_running": fr, "c2i": 0.9, "c2i_diff": 0, "nonfinite_grads": 0,
                           "sign_hash": rng.integers(0, 2**62, S * LAYERS), "gamma": gamma, "threshold": tau,
                           "lr": np.nan, "sigma": np.nan, "margin_exceed_1": flips.astype(float),
                           "above_threshold": 0.5 * nw[li], "crossings_up": 1.0,
                           "crossings_down": 1.0, "abs_m_mean": med * 1.6})
        for q, z in zip(Q, Z, strict=True):
            df[f"abs_m_{q}"] = med * np.exp(z)
            df[f"wm_{q}"] = med * z
        w.append("steps", df)
        ts = steps[steps % TRACK_EVERY == 0]
        if ts.size:
            n = ts.size * LAYERS * TRACK
            w.append("tracked", pd.DataFrame({
                "step": np.repeat(ts, LAYERS * TRACK), "layer": np.tile(np.repeat(names, TRACK), ts.size),
                "index": np.tile(np.arange(TRACK), ts.size * LAYERS),
                "sign": rng.choice(np.array([-1, 1], dtype=np.int8), n), "inertia": rng.exponential(tau, n)}))
            n = ts.size * LAYERS * EVENTS
            w.append("events", pd.DataFrame({
                "step": np.repeat(ts, LAYERS * EVENTS), "layer": np.tile(np.repeat(names, EVENTS), ts.size),
                "index": rng.integers(0, 1024, n), "inertia_before": rng.exponential(tau, n),
                "steps_since_last_flip": pd.array(rng.integers(1, 100, n), dtype="Int64")}))
        hs = steps[steps % 100 == 0]
        if hs.size:
            nb = len(edges) + 1
            n = hs.size * LAYERS * nb
            w.append("hists", pd.DataFrame({
                "step": np.repeat(hs, LAYERS * nb), "layer": np.tile(np.repeat(names, nb), hs.size),
                "quantity": "abs_m_rel", "bin": np.tile(np.arange(nb), hs.size * LAYERS),
                "left": np.tile([-np.inf, *edges], hs.size * LAYERS), "right": np.tile([*edges, np.inf],
                                                                                       hs.size * LAYERS),
                "count": rng.integers(0, 100, n)}))
        if steps[-1] % FLUSH == 0 or steps[-1] == n_steps:
            w.append("snapshots", pd.DataFrame({
                "step": int(steps[-1]), "layer": names, "n_weights": nw,
                "signs": [np.packbits(rng.integers(0, 2, k, dtype=np.uint8)).tobytes() for k in nw]}))
        tr = steps[steps % 50 == 0]
        if tr.size:
            acc = 1 - 0.9 * np.exp(-tr / max(n_steps / 3, 1))
            w.append("train", pd.concat([
                pd.DataFrame({"step": tr, "epoch": tr // 500, "name": name, "value": v})
                for name, v in (("train_loss", 1 - acc), ("train_accuracy", acc), ("val_accuracy", acc - 0.02))]))
    wf = [pd.DataFrame({"step": n_steps, "layer": names[i], "flips_per_weight": np.arange(20),
                        "n": rng.multinomial(int(nw[i]), np.ones(20) / 20)}) for i in range(LAYERS)]
    w.write_table("weight_flips", pd.concat(wf, ignore_index=True))
    w.write_meta({"format": "bnn-probe-run", "schema_version": 1, "status": "finished", "family": "bop",
                  "optimizer": {"class": "Bop", "groups": [{"index": 0, "gamma": gamma, "threshold": tau}]},
                  "model": {"class": "BenchMLP", "n_binary_weights": int(nw.sum())},
                  "config": {"model": "bench", "dataset": "none", "gamma": gamma, "threshold": tau}, "tag": "bench",
                  "last_step": n_steps})
    w.close()


def _child(run_dir: str, out: str) -> None:
    from bnn_probe.reports import generate

    t0 = time.perf_counter()
    res = generate([run_dir], out, progress=False)
    dt = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": dt, "peak_rss_mb": rss_mb, "stages": res.timings}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--out", default="/tmp/bench_report")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(*a.child)
        return
    root = Path(a.out)
    shutil.rmtree(root, ignore_errors=True)
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        run_dir = root / f"run_{n}"
        t0 = time.perf_counter()
        write_log(run_dir, n)
        t_write = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2**20
        # baseline of the child process: imports only
        r = subprocess.run([sys.executable, __file__, "--child", str(run_dir), str(root / f"report_{n}")],
                           capture_output=True, text=True, check=True)
        res = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"rows": n, "log_mb": round(size_mb, 1), "write_s": round(t_write, 1),
                     "report_s": round(res["seconds"], 2), "peak_rss_mb": round(res["peak_rss_mb"]),
                     "stages_s": res["stages"]})
        print(rows[-1], flush=True)
    print("\n| (step, layer) rows | log size (MB) | report time (s) | peak RSS (MB) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['rows']:,} | {r['log_mb']} | {r['report_s']} | {r['peak_rss_mb']} |")


if __name__ == "__main__":
    main()
