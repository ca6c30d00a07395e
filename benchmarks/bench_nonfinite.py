"""Cost of the non-finite gradient check in Bop and Bop2ndOrder (bnn_probe.optim.nonfinite), as a ratio in one run.

Each optimizer steps on the binary-weight shapes of BinaryNet (``--width-multiplier``, default 0.5) with finite
gradients, once with the check (the shipped step) and once with the check replaced by a pass-through; the two are
interleaved round by round and the medians compared. With finite gradients the check costs one multi-tensor norm
and one host synchronisation per param group and step.

    python benchmarks/bench_nonfinite.py                       # CPU
    python benchmarks/bench_nonfinite.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnn_probe.models import BinaryNet
from bnn_probe.nn import binary_parameters
from bnn_probe.optim import Bop, Bop2ndOrder
from bnn_probe.optim import bop as bop_mod
from bnn_probe.optim import bop2nd as bop2nd_mod


def _passthrough(optimizer, ws, states, gs, masked_step, bad):
    return ws, states, gs


def _nothing(optimizer):
    return set()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width-multiplier", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in binary_parameters(BinaryNet(width_multiplier=args.width_multiplier))]
    n = sum(torch.Size(s).numel() for s in shapes)
    print(f"{n:,} binary weights in {len(shapes)} tensors on {args.device}, {torch.get_num_threads()} threads")
    for cls, mod in ((Bop, bop_mod), (Bop2ndOrder, bop2nd_mod)):
        ws = [torch.nn.Parameter(torch.ones(s, device=args.device)) for s in shapes]
        for w in ws:
            w.grad = torch.randn_like(w) * 1e-3
        opt = cls(ws, gamma=1e-3, threshold=1e-6)
        checked = mod.skip_nonfinite, mod.nonfinite_params
        times: dict[str, list[float]] = {"checked": [], "unchecked": []}
        for r in range(args.rounds + 2):
            for label in (("checked", "unchecked") if r % 2 else ("unchecked", "checked")):  # alternate the order
                mod.skip_nonfinite, mod.nonfinite_params = checked if label == "checked" else (_passthrough, _nothing)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                opt.step()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if r >= 2:  # two warm-up rounds
                    times[label].append(time.perf_counter() - t0)
        mod.skip_nonfinite, mod.nonfinite_params = checked
        a, b = statistics.median(times["checked"]), statistics.median(times["unchecked"])
        print(f"{cls.__name__:12s} step with check {a * 1e3:8.2f} ms, without {b * 1e3:8.2f} ms, ratio {a / b:.2f}")


if __name__ == "__main__":
    main()
