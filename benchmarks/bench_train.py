"""Speed of the training runner against a bare loop doing the same training (no probe, no progress bar).

Both sides use the same data, model, initialisation, optimizer (``build_optimizer``), batch order and per-epoch
validation; the runner adds the probe (``bnn_probe.attach``, its defaults or the cadence given) and its logging.
Timed: the epochs (training + validation), plus the probe's final flush for the runner. Setup (data, model,
optimizer, attach) is not timed. Repeats are interleaved (runner, bare, runner, bare, ...) and the median is taken,
so a busy machine slows both sides alike.

    python benchmarks/bench_train.py                       # the cases of RESULTS.md
    python benchmarks/bench_train.py --case digits-mlp --repeats 5 --threads 1
    python benchmarks/bench_train.py --case digits-mlp-20 --repeats 5 --threads 1

Prints one JSON line per case: steps/s of the runner, of the runner with the probe's hooks removed ("loop only")
and of the bare loop, and the ratios bare ÷ runner (goal ≤ 1.10; medians, and ``ratio_best`` of the fastest repeat
of each side, the estimate least moved by other work on a shared machine; ``ratio_paired``: the median over repeats
of each repeat's own bare ÷ runner, the sides of a repeat run back to back in ABBA order, with
``ratio_paired_ci95``, a percentile-bootstrap 95 % interval of that median over the repeats) and bare ÷ loop-only,
and ``probe_us_per_step``: the median over repeats of the runner's time per step minus the loop-only side's, the
probe's own cost (its hooks, its step and its flushes), which moves less with the machine's speed than a ratio.

The repeats of one process share its memory layout and hash seed, which move the ratio by more than the spread
between its repeats (the same code gave paired medians from 1.087 to 1.107 in different processes, each with a
narrower interval). ``--processes N`` therefore runs the case in N fresh processes, one after another, and prints,
after each process's own line, a summary with the process as the unit: the median over processes of their paired
medians and its bootstrap interval over processes:

    python benchmarks/bench_train.py --case digits-mlp-20 --repeats 6 --threads 1 --clock cpu --processes 8
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from bnn_probe.data import load_dataset
from bnn_probe.models import build_model
from bnn_probe.train import StepDecay, TrainConfig, build_optimizer, evaluate, init_binary_weights, run_epoch, setup

CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU time of the process: less sensitive to other jobs)

CASES = {
    # the default run: digits, 64-256-256-10 MLP, Bop, batch 50 (3 epochs: 87 steps)
    "digits-mlp": TrainConfig(epochs=3),
    # the same with the default 20 epochs (580 steps): a run's fixed costs (the final flush) spread as in a real run
    "digits-mlp-20": TrainConfig(),
    # the default run with a sparser probe cadence
    "digits-mlp-probe10": TrainConfig(epochs=3, probe_every=10, hist_every=1000, snapshot_every=0),
    # a wide MLP: compute per step grows, the probe's per-layer work does not (much)
    "digits-mlp-wide": TrainConfig(epochs=2, widths=(2048, 2048)),
    # MNIST-1D with the 1-D conv net
    "mnist1d-cnn1d": TrainConfig(epochs=1, dataset="mnist1d", model="cnn1d"),
}


def bare(cfg: TrainConfig, data) -> tuple[float, int]:
    """The same training without probe or progress bar; returns (seconds, steps)."""
    c = cfg.resolved()
    torch.manual_seed(c.seed)
    model = build_model(c.model, in_shape=data.in_shape, num_classes=data.num_classes, widths=c.widths or None,
                        width_multiplier=c.width_multiplier, batch_norm=c.batch_norm, ste=c.ste, scale=c.weight_scale)
    init_binary_weights(model, c)
    opt = build_optimizer(model, c)
    sched = StepDecay(opt, c.decay_every, c.decay_factor)
    gen = torch.Generator().manual_seed(c.seed * 2 + 1)
    steps = 0
    t0 = CLOCK()
    for epoch in range(c.epochs):
        sched.apply(epoch)
        model.train()
        losses = []
        for x, y in data.batches(c.batch_size, gen):
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            steps += 1
        torch.stack(losses).tolist()
        evaluate(model, data.x_val, data.y_val)
    return CLOCK() - t0, steps


def runner(cfg: TrainConfig, data, root: Path, k: int, probe_hooks: bool = True) -> tuple[float, int]:
    """The runner's loop (``setup`` untimed, then ``run_epoch`` per epoch and the probe's close).

    ``probe_hooks=False`` removes the probe's optimizer hooks (a private handle list) so that only the runner's own
    work (its loop, logging, accuracy, schedule) is compared with the bare loop."""
    state = setup(cfg, root / f"run{k}", data=data, tensorboard=True)
    if not probe_hooks:
        for h in state.probe._handles:
            h.remove()
    t0 = CLOCK()
    while state.epoch < state.config.epochs:
        run_epoch(state)
    state.probe.close()
    return CLOCK() - t0, state.step


def bootstrap_median_ci(xs: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """A percentile-bootstrap 95 % interval of the median of ``xs`` (the repeats resampled with replacement)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return [round(meds[int(0.025 * n)], 3), round(meds[int(0.975 * n) - 1], 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="case(s) to run [default: all]")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall-clock time, or the CPU time of the process (all its threads; robust to time-slicing by "
                         "other jobs on a shared machine)")
    ap.add_argument("--processes", type=int, default=1,
                    help="run each case in this many fresh processes, one after another, and summarise over them")
    args = ap.parse_args()
    if args.processes > 1:
        for name in args.case or list(CASES):
            over_processes(name, args)
        return
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    for name in args.case or list(CASES):
        cfg = CASES[name]
        data = load_dataset(cfg.dataset, layout="flat")
        with tempfile.TemporaryDirectory() as tmp:
            bare(replace(cfg, epochs=1), data)  # warm-up (allocations, first-call costs)
            runner(replace(cfg, epochs=1), data, Path(tmp), -1)
            rs, ls, bs = [], [], []
            for k in range(args.repeats):
                for side in "rlb" if k % 2 == 0 else "blr":  # ABBA order: a linear drift cancels
                    if side == "b":
                        t, n = bare(cfg, data)
                    else:
                        t, n = runner(cfg, data, Path(tmp), k if side == "r" else 1000 + k, probe_hooks=side == "r")
                    {"r": rs, "l": ls, "b": bs}[side].append(n / t)
        r, lo, b = statistics.median(rs), statistics.median(ls), statistics.median(bs)
        pairs = [bb / rr for bb, rr in zip(bs, rs, strict=True)]
        paired = statistics.median(pairs)
        # the probe's own time per step: runner minus loop only, each repeat's two sides run back to back
        probe_us = statistics.median((1 / rr - 1 / ll) * 1e6 for rr, ll in zip(rs, ls, strict=True))
        print(json.dumps({"case": name, "steps": n, "threads": args.threads, "repeats": args.repeats,
                          "clock": args.clock,
                          "runner_steps_per_s": round(r, 1), "runner_loop_only_steps_per_s": round(lo, 1),
                          "bare_steps_per_s": round(b, 1), "ratio": round(b / r, 3),
                          "ratio_paired": round(paired, 3), "ratio_paired_ci95": bootstrap_median_ci(pairs),
                          "ratio_best": round(max(bs) / max(rs), 3),
                          "ratio_loop_only": round(b / lo, 3), "probe_us_per_step": round(probe_us, 1),
                          "runner_all": [round(x, 1) for x in rs],
                          "loop_only_all": [round(x, 1) for x in ls], "bare_all": [round(x, 1) for x in bs]}),
              flush=True)


def over_processes(name: str, args: argparse.Namespace) -> None:
    """``--processes N``: the case in N fresh processes (sequentially: they would compete for the cores); each
    process's own line is printed, then one summary line with the process as the unit of replication."""
    lines = []
    for _ in range(args.processes):
        cmd = [sys.executable, __file__, "--case", name, "--repeats", str(args.repeats), "--threads",
               str(args.threads), "--clock", args.clock]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        line = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(line), flush=True)
        lines.append(line)
    per = [x["ratio_paired"] for x in lines]
    print(json.dumps({"case": name, "processes": args.processes, "repeats": args.repeats, "threads": args.threads,
                      "clock": args.clock, "ratio_paired_per_process": per,
                      "ratio_paired_median_over_processes": round(statistics.median(per), 3),
                      "ratio_paired_ci95_over_processes": bootstrap_median_ci(per),
                      "ratio_loop_only_per_process": [x["ratio_loop_only"] for x in lines],
                      "probe_us_per_step_per_process": [x["probe_us_per_step"] for x in lines],
                      "probe_us_per_step_median_over_processes":
                          round(statistics.median(x["probe_us_per_step"] for x in lines), 1),
                      "bare_steps_per_s_per_process": [x["bare_steps_per_s"] for x in lines]}), flush=True)


if __name__ == "__main__":
    main()
