"""Bop step time vs torch.optim.Adam(foreach=True), and Bop's memory bandwidth vs Tensor.copy_, in one run.

Parameters: the binary-weight shapes of BinaryNet at full width (14,022,016 weights, bnn_probe.models.BinaryNet()).
Variants: Bop ``foreach=False`` (plain per-tensor loop, one torch.where per tensor), ``foreach=True`` (eager
torch._foreach_*, cache-blocked on CPU), the default (on the CPU the C step of optim/cstep.py, one pass over all
tensors; on CUDA the Triton kernel of optim/bop_triton.py, one launch, no host synchronisation), ``fused=True``
(the C step on the CPU, the Triton kernel on CUDA), and Adam(foreach=True) on the same shapes. On CUDA also
the Triton kernel called directly, on tensors of their own and on views one float into their storage (not
16-byte aligned: the kernel's variant without vector accesses). All steps go
through the optimizers' ``step()`` (Python overhead included). Timings are interleaved round by round and the
median is reported.

Bandwidth: a Bop step must read g, m, w and write m, w: 5 floats = 20 bytes per weight. Its effective bandwidth is
20·N / t, compared with ``dst.copy_(src)`` moving the same number of bytes (src and dst of 2.5·N floats each).
"Bop default, rare flips (+ probe)": the default step at τ = 6e-6 (≈ 0.1 % of the weights flip per step, as in
training), without and with a probe attached (its defaults without histograms and snapshots; the probe's hooks
included); on the CPU the measurement runs inside the C step, which then also reads and writes one state byte per
weight: 22·N bytes.

    python benchmarks/bench_bop.py                 # CPU, ~1 minute
    python benchmarks/bench_bop.py --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import tempfile
import time

import torch

import bnn_probe
from bnn_probe.models import BinaryNet
from bnn_probe.nn import binary_parameters
from bnn_probe.optim import Bop


def binarynet_shapes() -> list[tuple[int, ...]]:
    with torch.device("meta"):
        model = BinaryNet()
    return [tuple(p.shape) for p in binary_parameters(model)]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


RARE_TAU = 6e-6  # m ~ N(0, 1e-6), γ·g ~ N(0, 1e-7): ≈ 12,000 flips per step (0.09 % of the weights; measured)


def make_params(shapes, device, gen, binary: bool) -> list[torch.nn.Parameter]:
    params = []
    for s in shapes:
        if binary:
            data = (torch.randint(0, 2, s, generator=gen) * 2 - 1).float()
        else:
            data = torch.randn(s, generator=gen) * 0.1
        p = torch.nn.Parameter(data.to(device))
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(device)
        params.append(p)
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds (median reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--no-fused", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--no-probe", action="store_true", help="skip the variant with a probe attached")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = binarynet_shapes()
    n = sum(torch.Size(s).numel() for s in shapes)
    gen = torch.Generator().manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    adam_params = make_params(shapes, device, gen, binary=False)
    adam = torch.optim.Adam(adam_params, lr=1e-3, foreach=True)
    variants: dict[str, object] = {"Adam(foreach=True)": adam.step}
    # γ = 1e-4, τ = 1e-8 (larq defaults); m starts at 0, so the first steps flip nothing; pre-fill m so flips happen
    for name, kw in [("Bop loop (foreach=False)", dict(foreach=False)), ("Bop foreach=True", dict(foreach=True)),
                     ("Bop default", dict()), ("Bop fused=True", dict(fused=True))]:
        if "fused" in kw and args.no_fused:
            continue
        ps = make_params(shapes, device, gen, binary=True)
        opt = Bop(ps, gamma=1e-4, threshold=1e-8, **kw)
        for p in ps:
            opt.state[p]["exp_avg"] = (torch.randn(p.shape, generator=gen) * 1e-6).to(device)
        variants[name] = opt.step
    if device.type == "cuda":  # the Triton kernel without Bop.step's Python (host cost = launch + pointer table)
        from bnn_probe.optim import bop_triton

        kp = make_params(shapes, device, gen, binary=True)
        kw_, km, kg = [p.data for p in kp], [(torch.randn(p.shape, generator=gen) * 1e-6).to(device) for p in kp], \
            [p.grad for p in kp]
        kskip = torch.zeros(len(kp), dtype=torch.int64, device=device)
        variants["Triton kernel alone"] = lambda: bop_triton.step(kw_, km, kg, 1e-4, 1e-8, kskip)
        # the same on views one float into their storage: no 16-byte alignment, so no vector accesses (the kernel's
        # unhinted variant; what tensors that are views into a larger buffer get)
        uw, um, ug = ([torch.cat([t.new_zeros(1), t.flatten()])[1:] for t in ts] for ts in (kw_, km, kg))
        variants["Triton kernel, unaligned"] = lambda: bop_triton.step(uw, um, ug, 1e-4, 1e-8, kskip)
    probe = None
    if not args.no_probe:  # the default step with and without an attached probe, at a τ where flips are rare
        # (≈ 0.1 % of the weights per step, as in training; at τ = 1e-8 half of them flip every step and recording
        # the flips dominates the probe's cost): on the CPU the probe measures inside the C step
        for name, attach in (("Bop default, rare flips", False), ("Bop default, rare flips + probe", True)):
            ps = make_params(shapes, device, gen, binary=True)
            opt = Bop(ps, gamma=1e-4, threshold=RARE_TAU)
            for p in ps:
                opt.state[p]["exp_avg"] = (torch.randn(p.shape, generator=gen) * 1e-6).to(device)
            if attach:
                probe_dir = tempfile.TemporaryDirectory()
                probe = bnn_probe.attach(torch.nn.ParameterList(ps), opt, probe_dir.name, tensorboard=False,
                                         hist_every=0, snapshot_every=0)
            variants[name] = opt.step
    src = torch.randn(int(2.5 * n), generator=gen).to(device)
    dst = torch.empty_like(src)
    variants["copy_ (same bytes)"] = lambda: dst.copy_(src)

    t0 = time.perf_counter()
    for k, f in variants.items():  # warm-up: compiles the kernels; with a probe, its step and CUDA graphs too
        for _ in range(25 if k.endswith("probe") else 2):
            f()
    sync()
    warm = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, f in variants.items():
            sync()
            t = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t)

    back_to_back = {}
    if device.type == "cuda":  # 50 steps launched back to back, one synchronisation: the GPU-side cost per step
        for k in ("Adam(foreach=True)", "Bop default", "Bop fused=True", "Triton kernel alone",
                  "Triton kernel, unaligned"):
            if k in variants:
                sync()
                t = time.perf_counter()
                for _ in range(50):
                    variants[k]()
                sync()
                back_to_back[k] = (time.perf_counter() - t) / 50
    bop_bytes = 20 * n
    probe_bytes = 22 * n  # the measured step also reads and writes the probe's state byte per weight
    threads = torch.get_num_threads()
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {threads} threads"
    print(f"# {dev}; torch {torch.__version__}; {n:,} binary weights (BinaryNet, full width); "
          f"{args.rounds} interleaved rounds; warm-up incl. compile {warm:.1f} s")
    print("# median (min) over rounds; ratios and bandwidth shares use the same statistic on both sides; "
          "on a shared machine the min is the less disturbed one")
    stats = {"median": {k: statistics.median(v) for k, v in times.items()},
             "min": {k: min(v) for k, v in times.items()}}
    print(f"{'variant':26s} {'ms/step':>17s} {'× Adam':>15s} {'GB/s':>13s} {'% of copy_ BW':>15s}")
    for k in variants:
        med, mn = stats["median"][k], stats["min"][k]
        ms = f"{1e3 * med:8.2f} ({1e3 * mn:6.2f})"
        ratio = f"{med / stats['median']['Adam(foreach=True)']:6.3f} ({mn / stats['min']['Adam(foreach=True)']:5.3f})"
        if k.startswith(("Bop", "copy", "Triton")):
            nb = probe_bytes if k.endswith("probe") else bop_bytes
            bw = f"{nb / med / 1e9:5.1f} ({nb / mn / 1e9:5.1f})"
            cp_med, cp_min = (bop_bytes / stats[s]["copy_ (same bytes)"] for s in ("median", "min"))  # bytes/s
            pct = f"{100 * nb / med / cp_med:5.0f}% ({100 * nb / mn / cp_min:4.0f}%)"
        else:
            bw = pct = ""
        print(f"{k:26s} {ms:>17s} {ratio:>15s} {bw:>13s} {pct:>15s}")
    for k, v in back_to_back.items():
        print(f"back to back (50 steps, one sync): {k:22s} {1e3 * v:6.3f} ms/step, "
              f"{v / back_to_back['Adam(foreach=True)']:.3f} x Adam")
    if probe is not None:
        probe.close()
        probe_dir.cleanup()

if __name__ == "__main__":
    main()
