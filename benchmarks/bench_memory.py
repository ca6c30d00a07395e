"""Memory per binary weight: parameters + optimizer state, measured from the tensors after one step.

Helwegen et al. (2019) count real-valued variables kept per binary weight: Bop 1 (m; the weight itself is ±1),
latent SGD with momentum 2 (w̃, momentum), latent Adam 3 (w̃, m, v); Bop2ndOrder keeps 2 (m, v). In PyTorch the ±1
weight is itself a float tensor, so Bop stores 2 floats today; the last columns say what storing binary weights in
1 bit would give. Gradients (one float per weight for every method) are not counted.

    python benchmarks/bench_memory.py [--width 1.0]
"""

from __future__ import annotations

import argparse

import torch

from bnn_probe.models import BinaryNet
from bnn_probe.nn import binary_parameters
from bnn_probe.optim import Bop, Bop2ndOrder, binary_init_


def state_bytes(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> int:
    """Bytes of per-weight state tensors (scalars such as Adam's step counter are counted too)."""
    total = 0
    for p in params:
        for v in opt.state[p].values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=float, default=1.0, help="BinaryNet width multiplier")
    args = ap.parse_args()
    builders = {
        "Bop": lambda ps: Bop(ps, gamma=1e-4, threshold=1e-8),
        "Bop2ndOrder": lambda ps: Bop2ndOrder(ps, gamma=1e-4, sigma=1e-4),
        "latent SGD+momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
        "latent Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    }
    paper = {"Bop": 1, "Bop2ndOrder": 2, "latent SGD+momentum": 2, "latent Adam": 3}
    binary_weight_is_pm1 = {"Bop": True, "Bop2ndOrder": True, "latent SGD+momentum": False, "latent Adam": False}
    model = BinaryNet(width_multiplier=args.width)
    params = binary_parameters(model)
    n = sum(p.numel() for p in params)
    totals: dict[str, float] = {}
    print(f"# BinaryNet width {args.width}: {n:,} binary weights, float32; measured after one step")
    print(f"{'method':22s} {'paper #vars':>11s} {'param B/w':>9s} {'state B/w':>9s} {'total B/w':>9s} "
          f"{'total MB':>9s} {'1-bit w: B/w':>12s} {'saves':>6s}")
    for name, build in builders.items():
        if binary_weight_is_pm1[name]:
            binary_init_(params, seed=0)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = build(params)
        opt.step()
        pb = sum(p.numel() * p.element_size() for p in params)
        sb = state_bytes(opt, params)
        total = (pb + sb) / n
        if binary_weight_is_pm1[name]:
            packed = sb / n + 1 / 8
            saves = f"{100 * (1 - packed / total):5.1f}%"
            packed_s = f"{packed:12.3f}"
        else:
            packed_s, saves = f"{'(latent)':>12s}", f"{'—':>6s}"
        print(f"{name:22s} {paper[name]:11d} {pb / n:9.3f} {sb / n:9.3f} {total:9.3f} {(pb + sb) / 2**20:9.1f} "
              f"{packed_s} {saves}")
        totals[name] = total
        if binary_weight_is_pm1[name]:
            totals[name + " (1-bit w)"] = packed
        del opt
        for p in params:
            p.grad = None
    adam = totals["latent Adam"]
    print(f"# vs latent Adam ({adam:.3f} B/w): Bop {totals['Bop'] / adam:.2f}×, Bop with 1-bit weights "
          f"{totals['Bop (1-bit w)'] / adam:.2f}×; Bop2ndOrder {totals['Bop2ndOrder'] / adam:.2f}×, with 1-bit weights "
          f"{totals['Bop2ndOrder (1-bit w)'] / adam:.2f}×")

if __name__ == "__main__":
    main()
