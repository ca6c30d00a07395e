"""The compiled pass's calls timed inside training: wall time per step of ``OnePass.pre`` (pre-step sign pass, or
the request to bnn_probe's Bop), ``OnePass.run`` (Bop's step with the measurement inside, optim/cstep.py),
``Bop.step`` (which contains ``run``), ``OnePass.post`` (post-step pass, or the events and tracked weights after the
fused step) and ``OnePass.steps`` (sort + rows), and of the probe's two hooks around them, in the loop of
``bench_probe.train_steps`` with the probe at its defaults.

    python benchmarks/pass_split.py --case wide-mlp --steps 20 --threads 1

Prints one line: the case, ms per step with the probe off (and of ``Bop.step`` then) and on, and ms per step of each
timed part with the probe on.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch

import bnn_probe
from bnn_probe.optim import Bop
from bnn_probe.probe import onepass
from bnn_probe.probe import probe as probe_mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_probe import make_case, train_steps  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="wide-mlp", choices=("mlp", "wide-mlp", "binarynet"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    acc: dict[str, float] = collections.defaultdict(float)

    def wrap(cls, name: str, key: str) -> None:
        f = getattr(cls, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t

        setattr(cls, name, timed)

    for cls, name in ((onepass.OnePass, "pre"), (onepass.OnePass, "post"), (onepass.OnePass, "steps"),
                      (onepass.OnePass, "run"), (Bop, "step"),
                      (probe_mod.Probe, "_pre_hook"), (probe_mod.Probe, "_post_hook")):
        wrap(cls, name, name.strip("_"))
    dev = torch.device("cpu")
    model, bop, adam, batches = make_case(args.case, dev)
    train_steps(model, bop, adam, batches, 3, dev)
    acc.clear()
    off = train_steps(model, bop, adam, batches, args.steps, dev)
    step_off = acc["step"] / args.steps * 1e3  # Bop.step without the probe, in the same loop
    with tempfile.TemporaryDirectory() as d:
        probe = bnn_probe.attach(model, bop, d)
        train_steps(model, bop, adam, batches, 2, dev)
        acc.clear()
        on = train_steps(model, bop, adam, batches, args.steps, dev)
        probe.close()
    parts = ", ".join(f"{k} {v / args.steps * 1e3:.3f}" for k, v in acc.items())
    print(f"{args.case}: off {off * 1e3:.2f} ms/step (Bop.step {step_off:.3f}), on {on * 1e3:.2f} ms/step; "
          f"per step (ms): {parts}")


if __name__ == "__main__":
    main()
