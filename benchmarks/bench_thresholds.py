"""Overhead of the calibrated threshold controller: per-step training time of the digits MLP
64 → 2048 → 64 → 1024 → 10 (batch 64) with Bop and one global τ, against the same with
``thresholds.calibrated(1e-3)`` hooked on the optimizer. On/off repetitions alternate; median per-step time.

    python benchmarks/bench_thresholds.py [--steps 200] [--reps 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnn_probe.data import load_dataset
from bnn_probe.models import BinaryMLP
from bnn_probe.nn import binary_parameters, named_binary_parameters
from bnn_probe.optim import Bop, CaseOptimizer, binary_init_
from bnn_probe.optim import thresholds as T


def one(steps: int, controller: bool, data) -> float:
    torch.manual_seed(0)
    model = BinaryMLP(64, [2048, 64, 1024], 10)
    binary_init_(model, seed=0)
    pol = T.calibrated(1e-3) if controller else T.global_threshold(1e-6)
    bop = Bop(pol.param_groups(named_binary_parameters(model), gamma=1e-3))
    ids = {id(p) for p in binary_parameters(model)}
    opt = CaseOptimizer(bop, torch.optim.Adam([p for p in model.parameters() if id(p) not in ids], lr=1e-2))
    pol.attach(opt)
    x, y = data.x_train[:64], data.y_train[:64]
    lossf = torch.nn.CrossEntropyLoss()
    for _ in range(5):  # warm-up
        opt.zero_grad()
        lossf(model(x), y).backward()
        opt.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        lossf(model(x), y).backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = load_dataset("digits")
    off, on = [], []
    for _ in range(a.reps):
        off.append(one(a.steps, False, data))
        on.append(one(a.steps, True, data))
    mo, mn = statistics.median(off), statistics.median(on)
    print(f"global τ: {1e3 * mo:.3f} ms/step; calibrated: {1e3 * mn:.3f} ms/step; ratio {mn / mo:.3f} "
          f"(median of {a.reps} × {a.steps} steps, {a.threads} thread(s), torch {torch.__version__})")


if __name__ == "__main__":
    main()
