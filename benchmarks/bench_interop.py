"""Probe overhead on models built with bitorch, bnn and brevitas (the adapters of bnn_probe.integrations).

    python benchmarks/bench_interop.py [--reps 7] [--steps 40] [--threads 1]

Cases (tests/_interop.py, digits 8×8, batch 64, latent Adam lr 1e-2, probe attached with ``binary=None``):
bitorch conv net (QConv2d 16→32 + QLinear, ``sign``), bnn conv net (XNOR binarizer with centred weights, no α),
brevitas MLP (two QuantLinear 128 with ``SignedBinaryWeightPerTensorConst``). Probe on/off alternate in one run
(reps × steps each; the median per-step CPU time of each mode and their ratio). Attach/close and the first step
after attach are outside the timed window. A library that is not installed is skipped. The bnn case is also run with
``binarizer=SIGN`` (bnn-probe's sign on the fast path: the wrong quantity, measured only to isolate the cost of the
per-layer binarizer stage).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _interop import bitorch_net, bnn_net, brevitas_net, digits  # noqa: E402

import bnn_probe  # noqa: E402
from bnn_probe.probe.binarizers import SIGN  # noqa: E402

CASES = {"bitorch conv net": ("bitorch", bitorch_net), "bnn conv net (centred XNOR)": ("bnn", bnn_net),
         "brevitas MLP": ("brevitas", brevitas_net)}


def steps(model, opt, x, y, k: int, batch: int = 64) -> float:
    t0 = time.process_time()
    for i in range(k):
        s = slice((i * batch) % len(x), (i * batch) % len(x) + batch)
        loss = torch.nn.functional.cross_entropy(model(x[s]), y[s])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.process_time() - t0) / k


def bench(make, reps: int, k: int, root: Path, name: str, **attach) -> dict:
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = digits(512)
    steps(model, opt, x, y, 5)
    off, on = [], []
    for r in range(reps):
        off.append(steps(model, opt, x, y, k))
        probe = bnn_probe.attach(model, opt, root / f"{name}-{r}", tensorboard=False, **attach)
        steps(model, opt, x, y, 1)
        on.append(steps(model, opt, x, y, k))
        layers = [(ly.name, ly.binarizer.describe()) for ly in probe.layers]
        probe.close()
    a, b = statistics.median(off), statistics.median(on)
    return {"off_ms": 1e3 * a, "on_ms": 1e3 * b, "ratio": b / a, "layers": layers,
            "n_binary": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), {a.reps} reps × {a.steps} steps, CPU time per step")
    with tempfile.TemporaryDirectory() as d:
        for name, (lib, make) in CASES.items():
            try:
                __import__(lib)
            except ImportError:
                print(f"{name}: {lib} not installed, skipped")
                continue
            variants = {name: {}}
            if lib == "bnn":  # the binarizer stage's own cost: the same model measured with bnn-probe's sign
                variants[f"{name}, binarizer=SIGN"] = {"binarizer": SIGN}
            for label, kw in variants.items():
                r = bench(make, a.reps, a.steps, Path(d), f"{lib}{len(kw)}", **kw)
                print(f"{label:<28} off {r['off_ms']:7.2f} ms  on {r['on_ms']:7.2f} ms  ratio {r['ratio']:.2f}  "
                      f"layers {r['layers']}")


if __name__ == "__main__":
    main()
