"""Cost of one probe flush (Parquet parts, weight_flips.parquet, meta.json, TensorBoard) on BinaryNet's binary
weights, with the weight_flips histogram kept flip by flip in the compiled pass against the same flush rebuilding it
by a bincount of every per-weight flip counter (what every flush did before), alternating in one run.

The binary weights of BinaryNet at full width (14,022,016, 9 layers) are stepped by bnn-probe's Bop on synthetic
gradients (no forward/backward: the flush does not depend on them), a probe attached with its defaults; each round
runs ``--steps`` optimizer steps and then times ``probe.flush()``, alternately as is and with every layer's histogram
marked for rebuilding (``OnePass.fover``), which makes that flush take the bincount path.

    python benchmarks/bench_flush.py --threads 1

Prints one JSON line: the median flush time (ms) of each kind, their ratio and the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import bnn_probe
from bnn_probe.models import BinaryNet
from bnn_probe.nn import binary_parameters
from bnn_probe.optim import Bop, binary_init_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6, help="flushes of each kind")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps before each flush")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = BinaryNet()
    binary_init_(model, seed=0)
    params = list(binary_parameters(model))
    opt = Bop(params, gamma=1e-2, threshold=1e-3)
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {"kept": [], "bincount": []}
    with tempfile.TemporaryDirectory() as d:
        probe = bnn_probe.attach(model, opt, d, flush_every_steps=10**9, flush_secs=1e9)
        ops = [g.onepass for g in probe.groups if getattr(g, "onepass", None) is not None]
        if not ops:
            raise SystemExit("the compiled pass is not built: nothing to compare")

        def steps() -> None:
            for _ in range(args.steps):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()

        steps()
        probe.flush()  # first flush: directories, schemas, the TensorBoard file
        for r in range(2 * args.rounds):
            kind = "kept" if r % 2 == 0 else "bincount"
            steps()
            if kind == "bincount":
                for op in ops:
                    op.fover[:] = 1
            t0 = time.perf_counter()
            probe.flush()
            times[kind].append(time.perf_counter() - t0)
        probe.close()
    kept, binc = (statistics.median(times[k]) * 1e3 for k in ("kept", "bincount"))
    print(json.dumps({"weights": sum(p.numel() for p in params), "layers": len(params), "threads": args.threads,
                      "steps_between": args.steps, "flush_ms_kept": round(kept, 1),
                      "flush_ms_bincount": round(binc, 1), "ratio": round(kept / binc, 3),
                      "kept_all": [round(t * 1e3, 1) for t in times["kept"]],
                      "bincount_all": [round(t * 1e3, 1) for t in times["bincount"]]}))


if __name__ == "__main__":
    main()
