"""Per-step cost of the probe's recording (everything after the measurement): ``Recorder.add_*``, the batched
drains, the Parquet parts and the TensorBoard events, at the probe's default cadences.

The measurement is replaced by synthetic CPU tensors of the shapes the probe hands over (steps ``[L, 4]`` int64 and
``[L, K]`` float64, tracked ``[L·64]`` bool + ``[L·64, 2]``, events ``[L·16, 2]`` ×2, histograms every 100 steps,
sign snapshots every 1000; at each flush also ``weight_flips.parquet`` from int32 per-weight flip counters), written
into a real run folder with a :class:`~bnn_probe.runlog.writer.RunWriter`. The values are random (measured floats do
not compress); the inputs are views of buffers reused every step (as a measurement that recycles its buffers hands
them over), so a recorder that keeps references instead of copying would log wrong values; the benchmark checks the
read-back log.

Layer shapes: the digits MLP 64-256-256-10 (3 binary layers) and BinaryNet full width (9 binary layers). The same
process times a bare training step of the digits MLP (Bop, batch 50) so that the recording cost is also given as a
fraction of a step (ratios in one run).

    python benchmarks/bench_recorder.py --threads 1
    python benchmarks/bench_recorder.py --case mlp --steps 4000 --no-tensorboard

Prints one JSON line per (case, tensorboard): µs per step in total and split into add (per-step calls), drain
(device → host rows, amortised), flush (Parquet parts + TensorBoard events, amortised), and the close.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bnn_probe.probe.recorder import Recorder
from bnn_probe.runlog.schema import HIST_EDGES
from bnn_probe.runlog.writer import RunWriter

CASES: dict[str, list[int]] = {
    "mlp": [64 * 256, 256 * 256, 256 * 10],
    "binarynet": [3456, 147456, 294912, 589824, 1179648, 2359296, 8388608, 1048576, 10240],
}
TRACK, EVENTS, HIST_EVERY, SNAP_EVERY, FLUSH_EVERY, BUFFER = 64, 16, 100, 1000, 1000, 256
CLOCK = time.perf_counter  # --clock cpu: time.thread_time (this thread's CPU time: less sensitive to other jobs)


def run_once(sizes: list[int], steps: int, root: Path, tensorboard: bool, fresh: bool = False) -> dict[str, float]:
    """One recording of ``steps`` steps; seconds per phase. ``fresh``: hand over new tensors each step (copies of
    the reused buffers, made outside the timed calls) instead of views of the reused buffers."""
    L, K = len(sizes), len(Recorder.FLOAT_COLUMNS)
    rng = np.random.default_rng(0)
    names = [f"layer{i}.weight" for i in range(L)]
    writer = RunWriter(root, tensorboard=tensorboard)
    rec = Recorder(writer, names, sizes, ["bop"] * L, buffer_steps=BUFFER)
    rec.track_layout = [(li * TRACK, np.sort(rng.choice(n, TRACK, replace=False))) for li, n in enumerate(sizes)]
    rec.events_per_layer = EVENTS
    # reused buffers (numpy) handed over as torch views, rewritten every step
    ints_np = np.zeros((L, 4), np.int64)
    floats_np = np.full((L, K), np.nan)
    hyper = np.tile(np.array([1e-4, 1e-8, 1e-4, np.nan]), (L, 1))
    t_signs = np.zeros(L * TRACK, np.bool_)
    t_float = np.zeros((L * TRACK, 2))
    e_ints = np.full((L * EVENTS, 2), -1, np.int64)
    e_float = np.zeros((L * EVENTS, 2))
    ints, floats = torch.from_numpy(ints_np), torch.from_numpy(floats_np)
    ts, tf, ei, ef = (torch.from_numpy(a) for a in (t_signs, t_float, e_ints, e_float))
    nbins = {q: len(e) + 1 for q, e in HIST_EDGES.items()}
    hist_counts = {q: torch.from_numpy(rng.integers(0, 50, (L, nb))) for q, nb in nbins.items()}
    hist_stats = torch.tensor([0.0, 5.0, 10.0, 40.0], dtype=torch.float64)
    snap_bits = [torch.from_numpy(rng.random(n) < 0.5) for n in sizes]
    counters = [torch.from_numpy(rng.integers(0, 8, n, dtype=np.int32)) for n in sizes]  # per-weight flip counts
    n_arr = np.asarray(sizes)
    t_add = t_drain = t_flush = 0.0
    last_flush = 0
    for t in range(1, steps + 1):
        ints_np[:, 0] = (n_arr * 0.01 * (1 + np.sin(t))).astype(np.int64)  # flips
        ints_np[:, 1] = n_arr // 3
        ints_np[:, 3] = t * 7919
        floats_np[:, :25] = rng.random((L, 25))
        t_signs[:] = rng.random(L * TRACK) < 0.5
        t_float[:, 0] = t  # inertia = the step: the check below finds each step's own values
        t_float[:, 1] = rng.random(L * TRACK)
        e_ints[:, 0] = rng.integers(0, 1000, L * EVENTS)
        e_ints[:, 1] = rng.integers(-1, 100, L * EVENTS)
        e_float[:] = rng.random((L * EVENTS, 2))
        args = [x.clone() for x in (ints, floats, ts, tf, ei, ef)] if fresh else (ints, floats, ts, tf, ei, ef)
        a = CLOCK()
        rec.add_steps(t, args[0], args[1], hyper)
        rec.add_events(t, args[4], args[5])
        rec.add_tracked(t, args[2], args[3])
        if t % HIST_EVERY == 0:
            for li in range(L):
                for q in ("abs_m_rel", "wm_rel", "abs_m"):
                    rec.add_hist(t, li, q, hist_counts[q][li], hist_stats)
        if t % SNAP_EVERY == 0:
            for li in range(L):
                rec.add_snapshot(t, li, snap_bits[li])
        rec.add_train(t, 0, {"train_loss": 1.0 / t})
        b = CLOCK()
        t_add += b - a
        if rec.pending() >= rec.buffer_steps:
            rec.drain()
        c = CLOCK()
        t_drain += c - b
        if t - last_flush >= FLUSH_EVERY:
            rec.flush()
            rec.write_weight_flips(t, counters)
            last_flush = t
        t_flush += CLOCK() - c
    a = CLOCK()
    rec.flush()
    rec.write_weight_flips(steps, counters)
    writer.close()
    t_close = CLOCK() - a
    return {"add": t_add, "drain": t_drain, "flush": t_flush, "close": t_close}


def check(root: Path, steps: int, sizes: list[int]) -> None:
    """The log holds every step once, with the values of that step (not of a later one)."""
    s = pd.read_parquet(root / "steps")
    assert len(s) == steps * len(sizes), (len(s), steps)
    assert (s.sign_hash.astype("int64") == s.step * 7919).all()
    tr = pd.read_parquet(root / "tracked")
    assert len(tr) == steps * len(sizes) * TRACK and (tr.inertia == tr.step).all()


def bare_step_seconds(steps: int = 300) -> float:
    """Median seconds of one bare training step of the digits MLP (Bop, batch 50), no probe."""
    import torch.nn.functional as F

    from bnn_probe.data import load_dataset
    from bnn_probe.models import build_model
    from bnn_probe.train import TrainConfig, build_optimizer, init_binary_weights

    c = TrainConfig().resolved()
    data = load_dataset("digits", layout="flat")
    torch.manual_seed(0)
    model = build_model("mlp", in_shape=data.in_shape, num_classes=data.num_classes, widths=c.widths)
    init_binary_weights(model, c)
    opt = build_optimizer(model, c)
    gen = torch.Generator().manual_seed(1)
    times: list[float] = []
    while len(times) < steps:
        for x, y in data.batches(50, gen):
            a = CLOCK()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(CLOCK() - a)
    return statistics.median(times[20:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="case(s) to run [default: all]")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-tensorboard", action="store_true", help="only the runs without TensorBoard")
    ap.add_argument("--fresh", action="store_true", help="hand over new tensors every step (no reused buffers)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall-clock time, or the CPU time of the timing thread (TensorBoard's own writer thread, "
                         "in versions that use one, is then not counted)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    step_s = bare_step_seconds()
    print(json.dumps({"bare_digits_mlp_step_us": round(step_s * 1e6, 1), "clock": args.clock}), flush=True)
    for name in args.case or list(CASES):
        sizes = CASES[name]
        for tb in ([False] if args.no_tensorboard else [True, False]):
            with tempfile.TemporaryDirectory() as tmp:
                run_once(sizes, 300, Path(tmp) / "warm", tb, args.fresh)
                res = []
                for k in range(args.repeats):
                    res.append(run_once(sizes, args.steps, Path(tmp) / f"r{k}", tb, args.fresh))
                check(Path(tmp) / "r0", args.steps, sizes)
            med = {p: statistics.median(r[p] for r in res) / args.steps * 1e6 for p in res[0]}
            total = sum(med.values())
            print(json.dumps({"case": name, "layers": len(sizes), "tensorboard": tb, "steps": args.steps,
                              "repeats": args.repeats, "us_per_step": round(total, 1),
                              **{f"{p}_us": round(v, 1) for p, v in med.items()},
                              "fraction_of_mlp_step": round(total / (step_s * 1e6), 3)}), flush=True)


if __name__ == "__main__":
    main()
