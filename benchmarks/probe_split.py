"""Where the probe's time goes inside ``bnn-probe train``: CPU time of the calling thread per component, per step.

One run of the runner (``setup`` + ``run_epoch``, the probe at its defaults) with thread-CPU timers wrapped around
the probe's parts: the optimizer hooks (``pre_hook``, ``post_hook``: what they do outside the parts below), the
lane's routing before the step and taking of the rows after it (``lane_pre``, ``lane_post``, probe/lane.py), the
general path's measurement (``FlatGroup.measure``) and pre-step capture (``FlatGroup.before_step``),
``Probe._hyper``, the run checks (``checks``), the recorder's ``add_*`` calls and drains, ``Probe.flush``
(Parquet parts, TensorBoard, ``weight_flips.parquet``, scales, ``meta.json``), and ``bop_step_with_pass``: Bop's
C step with the measurement inside it (``OnePass.run``; this one includes the optimizer step itself, which the
bare loop also does). Each part's time is exclusive: time spent in a nested part counts in that part only. A first
2-epoch run warms the process up (imports, allocations) and is not counted.

    python benchmarks/probe_split.py --epochs 35 --threads 1

Prints one JSON line: total CPU ms per step of the run and µs per step of each part.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import torch

from bnn_probe.data import load_dataset
from bnn_probe.probe import checks, flat, lane, onepass, probe, recorder
from bnn_probe.train import TrainConfig, run_epoch, setup

PARTS = [
    (probe.Probe, "_pre_hook", "pre_hook"), (probe.Probe, "_post_hook", "post_hook"),
    (lane.Lane, "pre", "lane_pre"), (lane.Lane, "post", "lane_post"), (onepass.OnePass, "run", "bop_step_with_pass"),
    (checks.RunChecks, "pre_step", "checks"), (checks.RunChecks, "post_step", "checks"),
    (flat.FlatGroup, "measure", "measure"), (flat.FlatGroup, "before_step", "pre_step"),
    (probe.Probe, "_hyper", "hyper"), (probe.Probe, "flush", "flush"), (recorder.Recorder, "drain", "drain"),
    *[(recorder.Recorder, n, "add") for n in ("add_steps", "add_tracked", "add_events", "add_hist", "add_snapshot",
                                              "add_train")],
]


def instrument(acc: dict[str, float]) -> None:
    """Wrap every part of PARTS with a thread-CPU timer adding its exclusive time to ``acc[part]``."""
    nested: list[float] = []  # per open part: the time of the parts nested in it so far

    def wrap(cls, name: str, key: str) -> None:
        f = getattr(cls, name)

        def timed(*a, **k):
            nested.append(0.0)
            t = time.thread_time()
            try:
                return f(*a, **k)
            finally:
                dt = time.thread_time() - t
                acc[key] += dt - nested.pop()
                if nested:
                    nested[-1] += dt

        setattr(cls, name, timed)

    for cls, name, key in PARTS:
        wrap(cls, name, key)


def run(epochs: int, root: Path, data) -> tuple[float, int]:
    st = setup(TrainConfig(epochs=epochs), root, data=data)
    t0 = time.thread_time()
    while st.epoch < st.config.epochs:
        run_epoch(st)
    st.probe.close()
    return time.thread_time() - t0, st.step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=35)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    acc: dict[str, float] = collections.defaultdict(float)
    instrument(acc)
    data = load_dataset("digits", layout="flat")
    with tempfile.TemporaryDirectory() as tmp:
        run(2, Path(tmp) / "warm", data)
        acc.clear()
        total, steps = run(args.epochs, Path(tmp) / "run", data)
    print(json.dumps({"steps": steps, "threads": args.threads, "cpu_ms_per_step": round(total / steps * 1e3, 3),
                      **{f"{k}_us": round(v / steps * 1e6, 1) for k, v in sorted(acc.items(), key=lambda x: -x[1])}}))


if __name__ == "__main__":
    main()
