"""What the measurement adds to Bop's compiled step: ``bnnp_bop_update`` (the step alone, what the bare loop runs)
against ``bnnp_bop_fused`` (the same step with the probe's every-step measurement in the same pass), both called
directly through ctypes on the same tensors in a warm loop (no Python around them, no training step in between), on
the binary layers of bench_probe.py's digits MLP (64-256-256-10) and wide MLP (64-2048-2048-10).

    python benchmarks/bench_fused_pass.py --threads 1

Prints one JSON line per MLP: binary weights, median µs per call of each, the ratio and ns per weight. Both calls
step the weights (the fused one also updates the probe's per-weight state), so each timed call is a real step.
Inside a training step the caches are cold and both take longer (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import bnn_probe
from bnn_probe.nn import binary_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probe import make_case  # noqa: E402


def case(name: str, calls: int) -> dict:
    model, opt, _, _ = make_case(name, torch.device("cpu"))  # bench_probe's MLP and its Bop (γ, τ)
    with tempfile.TemporaryDirectory() as tmp:
        probe = bnn_probe.attach(model, opt, tmp, tensorboard=False)
        ps = binary_parameters(model)
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):  # the probe's state, m and a measured step exist
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-3
            opt.step()
        op = probe.groups[0].onepass
        k = op.k
        ms = [opt.state[p]["exp_avg"] for p in ps]
        ptr = np.array([[p.data_ptr(), m.data_ptr(), p.grad.data_ptr()] for p, m in zip(ps, ms, strict=True)],
                       dtype=np.uintp).T.copy()
        lens = np.array([p.numel() for p in ps], dtype=np.int64)
        gm, tau = opt.param_groups[0]["gamma"], opt.param_groups[0]["threshold"]
        hp = np.array([[gm, 1 - gm, tau]] * len(ps), dtype=np.float32)
        bad = np.zeros(len(ps), dtype=np.int64)

        def update() -> None:
            k.bop_update(len(ps), ptr[0].ctypes.data, ptr[1].ctypes.data, ptr[2].ctypes.data, lens.ctypes.data,
                         hp.ctypes.data, bad.ctypes.data)

        def fused() -> None:
            k.bop_fused(op.pplan)

        times: dict[str, list[float]] = {"update": [], "fused": []}
        for _ in range(2):  # alternated blocks: a drift of the machine affects both
            for side, fn in (("update", update), ("fused", fused)):
                for _ in range(calls):
                    t = time.perf_counter_ns()
                    fn()
                    times[side].append((time.perf_counter_ns() - t) / 1e3)
        probe.close()
    n = int(lens.sum())
    u, f = statistics.median(times["update"]), statistics.median(times["fused"])
    return {"mlp": name, "binary_weights": n, "update_us": round(u, 1), "fused_us": round(f, 1),
            "ratio": round(f / u, 2), "update_ns_per_weight": round(u * 1e3 / n, 3),
            "fused_ns_per_weight": round(f * 1e3 / n, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, calls in (("mlp", args.calls), ("wide-mlp", max(10, args.calls // 10))):
        print(json.dumps(case(name, calls)), flush=True)


if __name__ == "__main__":
    main()
