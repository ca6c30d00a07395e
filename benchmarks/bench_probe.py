"""Probe overhead: training-step time with the probe attached / without, alternating on/off repetitions in one run.

    python benchmarks/bench_probe.py [--device cuda] [--quick] [--profile] [--ops] [--threads 1]
                                     [--compile-probe auto|on|off] [--device-path] [--bandwidth]
                                     [--cases binarynet,binarynet_hist16,mlp_digits,wide-mlp,bitorch]

Cases: BinaryNet full width (32×32×3 random inputs, batch 50, Bop on the binary weights + Adam on the rest),
probe at its defaults and with histograms every 16 steps; the small binary MLP on scikit-learn digits (worst case:
tiny steps; 100 timed steps per repetition, so one histogram and one run-check step each); ``wide-mlp``: BinaryMLP
64-2048-2048-10 on digits (4.3 M binary weights), Bop, probe defaults, also 100 timed steps per repetition;
``bitorch``: the bitorch conv net of tests/_interop.py (QConv2d + QLinear, found by the adapter, latent Adam).
Reports the median per-step time of each mode, the ratio, and the log's bytes per (step, layer) row.
Attach/close and the final flush are outside the timed window; periodic drains inside it are timed.
``--ops`` counts the probe's dispatcher-level ATen calls per step (probe on minus probe off, MLP and BinaryNet);
``--bandwidth`` adds, per case, the probe pass's achieved bandwidth: BYTES_PER_WEIGHT × (binary weights) divided by
(probe-on minus probe-off median step time), next to ``copy_`` bandwidth of a float32 buffer with as many elements as
binary weights, measured in the same run (2 × 4 bytes moved per element: read + write).
``--threads N`` sets ``torch.set_num_threads(N)`` (CPU comparisons: 1).
``--compile-probe`` is attach's ``compile_probe`` (auto: compiled on CUDA, not on CPU); ``--device-path`` forces the
pure-torch measurement on CPU too. The first probe-on steps after attach (``--settle``: 1 on the CPU, 21 on CUDA,
where they compile the probe's step and capture its CUDA graphs, one per cadence combination at its second step) are
outside the timed window; their mean time is printed. ``--variants '[{}, {"cuda_graphs": false}]'`` runs every case
once per attach() option set in the same process (graphs on and off after one compile).
On CUDA each case also prints the probe's device memory while attached in its first repetition: the growth of
``torch.cuda.memory_allocated`` (its buffers) and of ``memory_reserved`` (with CUDA graphs also their private pools,
which keep the captured steps' intermediates).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import bnn_probe
from bnn_probe.models import BinaryMLP, BinaryNet
from bnn_probe.nn import binary_parameters
from bnn_probe.optim import Bop, binary_init_

# Bytes per binary weight the probe must touch per step at minimum: float32 weight after the step (4, its sign is the
# new sign), the stored pre-step sign (1, int8/bool), float32 m or latent weight (4), float32 gradient (4) = 13.
# Writing the new sign for the next step (1 more byte, or 1/8 packed) is not counted.
BYTES_PER_WEIGHT = 13


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


class _NoStep:
    """Stands in for the second optimizer of a case whose one optimizer steps everything (the adapter case)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


def make_case(name: str, dev: torch.device):
    torch.manual_seed(0)
    if name == "bitorch":  # a model of a BNN library, found by the adapters (binary=None): latent Adam on everything
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from _interop import bitorch_net, digits

        model = bitorch_net().to(dev)
        x, y = digits(512)
        x, y = x.to(dev), y.to(dev)
        batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
        model.n_binary = None  # the adapter decides: counted from the probe's layers
        return model, torch.optim.Adam(model.parameters(), lr=1e-2), _NoStep(), batches
    if name == "binarynet":
        model = BinaryNet().to(dev)
        x = torch.randn(50, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (50,), device=dev)
        batches = [(x, y)]
    else:  # "mlp" (64-256-256-10) or "wide-mlp" (64-2048-2048-10), digits
        from sklearn.datasets import load_digits

        X, Y = load_digits(return_X_y=True)
        X = torch.tensor(X / 16.0, dtype=torch.float32, device=dev)
        Y = torch.tensor(Y, device=dev)
        model = BinaryMLP(64, [2048, 2048] if name == "wide-mlp" else [256, 256], 10).to(dev)
        g = torch.Generator().manual_seed(0)
        batches = [(X[i], Y[i]) for i in (torch.randint(0, len(X), (64,), generator=g) for _ in range(8))]
    binary_init_(model, seed=0)
    bins = binary_parameters(model)
    model.n_binary = sum(p.numel() for p in bins)
    ids = {id(p) for p in bins}
    bop = Bop(bins, gamma=1e-4 if name == "binarynet" else 1e-3, threshold=1e-8 if name == "binarynet" else 1e-6)
    adam = torch.optim.Adam([p for p in model.parameters() if id(p) not in ids], lr=1e-2)
    return model, bop, adam, batches


def train_steps(model, bop, adam, batches, k: int, dev) -> float:
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(k):
        x, y = batches[i % len(batches)]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        bop.zero_grad(set_to_none=True)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        bop.step()
        adam.step()
    _sync(dev)
    return (time.perf_counter() - t0) / k


def bench(name: str, dev, reps: int, k: int, warmup: int, probe_opts: dict, root: Path, label: str = "",
          settle: int = 1) -> dict:
    model, bop, adam, batches = make_case(name, dev)
    train_steps(model, bop, adam, batches, warmup, dev)
    off, on, first = [], [], []
    mem: list[tuple[float, float]] = []
    rows = 0
    bytes_steps = 0
    for r in range(reps):
        off.append(train_steps(model, bop, adam, batches, k, dev))
        logdir = root / f"{label or name}-{r}"
        mem0 = _cuda_mem(dev)
        probe = bnn_probe.attach(model, bop, logdir, **probe_opts)
        # the first steps after attach allocate the probe's buffers, compile its step (compile_probe) and capture
        # its CUDA graphs (one per cadence combination, at the combination's second step): not timed
        t_first = time.perf_counter()
        train_steps(model, bop, adam, batches, settle, dev)
        first.append((time.perf_counter() - t_first) / settle)
        on.append(train_steps(model, bop, adam, batches, k, dev))
        if mem0 is not None:  # the probe's device memory while attached: its buffers (allocated) and, with CUDA
            # graphs, their private pools too (reserved; a pool keeps the captured steps' intermediates)
            mem.append(tuple((b - a) / 2**20 for a, b in zip(mem0, _cuda_mem(dev), strict=True)))
        n_binary = sum(ly.n for ly in probe.layers)
        path = "compiled" if all(g.fused and g._step.compiled for g in probe.groups) else \
            "device-eager" if all(g.fused for g in probe.groups) else "cpu-onepass" if not any(
                g.fused for g in probe.groups) else "mixed"
        graphs = [g.graphs for g in probe.groups if getattr(g, "graphs", None) is not None and g.graphs.capture]
        if graphs:
            path += f"+cuda-graphs({sum(g.captured for g in graphs)} captured, {sum(g.replays for g in graphs)} " \
                    "replays)"
        probe.close()
        run = bnn_probe.load_run(logdir)
        rows += len(run.steps)
        bytes_steps += sum(f.stat().st_size for f in (logdir / "steps").glob("*.parquet"))
    t_off, t_on = statistics.median(off), statistics.median(on)
    return {"case": name, "opts": probe_opts, "off_ms": 1e3 * t_off, "on_ms": 1e3 * t_on, "ratio": t_on / t_off,
            "ratios": [b / a for a, b in zip(off, on, strict=True)], "bytes_per_step_row": bytes_steps / max(rows, 1),
            "rows": rows, "path": path, "first_ms": [1e3 * f for f in first], "n_binary": n_binary,
            "mem_mib": mem}


def _cuda_mem(dev) -> tuple[int, int] | None:
    """(allocated, reserved) bytes on a CUDA device after a synchronisation; None elsewhere."""
    if dev.type != "cuda":
        return None
    _sync(dev)
    return torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)


def copy_bandwidth(n: int, dev, reps: int = 20) -> float:
    """Median bytes/s of ``dst.copy_(src)`` on float32 buffers of n elements (8 bytes moved per element)."""
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ts = []
    for _ in range(reps):
        _sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    return 8 * n / statistics.median(ts)


def report_bandwidth(res: dict, dev) -> None:
    n = res["n_binary"]
    probe_s = (res["on_ms"] - res["off_ms"]) / 1e3
    need = BYTES_PER_WEIGHT * n
    cp = copy_bandwidth(n, dev)
    ach = need / probe_s if probe_s > 0 else float("inf")
    print(f"{res['case']:18s} bandwidth: {n} binary weights x {BYTES_PER_WEIGHT} B = {need / 1e6:.2f} MB per step;"
          f" probe time {1e3 * probe_s:.3f} ms/step -> {ach / 1e9:.3f} GB/s; copy_ float32[{n}] {cp / 1e9:.2f} GB/s;"
          f" achieved/copy_ {100 * ach / cp:.1f} %; floor at copy_ speed {1e3 * need / cp:.3f} ms", flush=True)


def profile(dev, root: Path, k: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    model, bop, adam, batches = make_case("binarynet", dev)
    train_steps(model, bop, adam, batches, 2, dev)
    probe = bnn_probe.attach(model, bop, root / "prof", tensorboard=False)
    train_steps(model, bop, adam, batches, 21, dev)  # compiled, graphs captured
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        train_steps(model, bop, adam, batches, k, dev)
    probe.close()
    if dev.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def host_profile(dev, root: Path, name: str, k: int = 200) -> None:
    """cProfile of k probe-on steps of one case after its graphs are captured: where the host's time goes (the
    training loop included), top 30 functions by own time."""
    import cProfile
    import pstats

    model, bop, adam, batches = make_case(name, dev)
    probe = bnn_probe.attach(model, bop, root / f"cprof-{name}", tensorboard=False)
    train_steps(model, bop, adam, batches, 41, dev)
    prof = cProfile.Profile()
    prof.enable()
    train_steps(model, bop, adam, batches, k, dev)
    prof.disable()
    probe.close()
    print(f"cProfile, {k} probe-on {name} steps:")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def op_counts(dev, root: Path, name: str, k: int = 8) -> float:
    """Dispatcher-level ATen calls per step made by the probe (probe-on steps minus probe-off steps)."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.c: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.c[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    model, bop, adam, batches = make_case(name, dev)
    train_steps(model, bop, adam, batches, 2, dev)
    with Count() as off:
        train_steps(model, bop, adam, batches, k, dev)
    probe = bnn_probe.attach(model, bop, root / f"ops-{name}", tensorboard=False)
    train_steps(model, bop, adam, batches, 2, dev)
    with Count() as on:
        train_steps(model, bop, adam, batches, k, dev)
    probe.close()
    diff = on.c.copy()
    diff.subtract(off.c)
    per = sum(diff.values()) / k
    top = ", ".join(f"{n} {v / k:.3g}" for n, v in diff.most_common(12) if v > 0)
    print(f"{name}: {len(probe.layers)} binary layers, {per:.1f} probe ATen calls per step ({top})", flush=True)
    return per


def run_case(case: str, dev, args, gpu: bool, popts: dict, root: Path, reps: int, k: int, warm: int, mlp_reps: int,
             mlp_k: int, settle: int) -> dict | None:
    label = f"{case}-{abs(hash(json.dumps(popts, sort_keys=True))) % 10**6}"
    if case == "binarynet":
        return bench("binarynet", dev, reps, k, warm, dict(popts), root, label, settle)
    if case == "binarynet_hist16":
        res = bench("binarynet", dev, reps, k, warm, {"hist_every": 16, **popts}, root, label, settle)
        res["case"] = "binarynet_hist16"
        return res
    if case == "mlp_digits":
        res = bench("mlp", dev, mlp_reps, mlp_k, 20, dict(popts), root, label, settle)
        res["case"] = "mlp_digits"
        return res
    if case == "bitorch":
        try:
            import bitorch  # noqa: F401
        except ImportError:
            print("bitorch          skipped (pip install bnn-probe[interop])")
            return None
        return bench("bitorch", dev, mlp_reps, mlp_k, 20, dict(popts), root, label, settle)
    if case == "wide-mlp":
        # 100 timed steps after the settle step: each window holds one histogram step and one run-check step
        # (hist_every = check_every = 100), so the ratio includes what the default cadences cost per step
        wr, wk = (2, 3) if args.quick else ((7, 100) if gpu else (5, 100))
        return bench("wide-mlp", dev, wr, wk, 3, dict(popts), root, label, settle)
    raise SystemExit(f"unknown case {case}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="few steps (CPU smoke run)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of probe-on BinaryNet steps")
    ap.add_argument("--cases", default="binarynet,binarynet_hist16,mlp_digits")
    ap.add_argument("--ops", action="store_true", help="count the probe's ATen calls per step")
    ap.add_argument("--bandwidth", action="store_true",
                    help="report the probe pass's achieved bytes/s against copy_ of a same-size float32 buffer")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--compile-probe", choices=("auto", "on", "off"), default="auto",
                    help="attach(compile_probe=...): auto = compiled on CUDA, eager on CPU")
    ap.add_argument("--device-path", action="store_true", help="attach(device_path=True): pure-torch path on CPU")
    ap.add_argument("--options", default="{}",
                    help='more attach() options as JSON, e.g. \'{"track_every": 10}\' (what one option costs)')
    ap.add_argument("--variants", default="",
                    help='JSON list of attach() option sets, each case run once per set in this process, e.g. '
                         '\'[{}, {"cuda_graphs": false}]\' (graphs on vs off, one compile for both)')
    ap.add_argument("--settle", type=int, default=0,
                    help="untimed probe-on steps after each attach (0: 21 on CUDA, where the probe's graphs are "
                         "captured at each cadence combination's second step; 1 elsewhere)")
    ap.add_argument("--cprofile", default="", help="cProfile 200 probe-on steps of this case (mlp, binarynet)")
    ap.add_argument("--reps", type=int, default=0, help="on/off repetitions per case (0: the defaults)")
    args = ap.parse_args()
    popts: dict = json.loads(args.options)
    if args.compile_probe != "auto":
        popts["compile_probe"] = args.compile_probe == "on"
    if args.device_path:
        popts["device_path"] = True
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    gpu = dev.type == "cuda"
    reps, k, warm = (3, 2, 1) if args.quick else ((7, 30, 10) if gpu else (3, 5, 2))
    mlp_reps, mlp_k = (3, 20) if args.quick else ((7, 200) if gpu else (5, 100))
    if args.reps > 0:
        reps = mlp_reps = args.reps
    print(f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()}"
          + (f" gpu={torch.cuda.get_device_name()}" if gpu else ""))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.ops:
            for name in ("mlp", "binarynet"):
                op_counts(dev, root, name)
        variants = json.loads(args.variants) if args.variants else [{}]
        settle = args.settle if args.settle > 0 else (21 if gpu else 1)
        for case in args.cases.split(","):
            for var in variants:
                res = run_case(case, dev, args, gpu, {**popts, **var}, root, reps, k, warm, mlp_reps, mlp_k, settle)
                if res is None:
                    continue
                tag = f" {json.dumps(var)}" if args.variants else ""
                print(f"{res['case']:18s}{tag} off {res['off_ms']:8.3f} ms  on {res['on_ms']:8.3f} ms  ratio "
                      f"{res['ratio']:.3f}  (per rep: {', '.join(f'{r:.3f}' for r in res['ratios'])})"
                      f"  bytes/(step,layer) row {res['bytes_per_step_row']:.1f} over {res['rows']} rows"
                      f"  [probe path {res['path']}; the {settle} untimed steps after attach"
                      f"{' (incl. compile)' if 'compiled' in res['path'] else ''}: "
                      f"{res['first_ms'][0]:.1f} ms/step in the first rep, later reps "
                      f"{', '.join(f'{x:.1f}' for x in res['first_ms'][1:])}]"
                      + (f"  [probe's CUDA memory while attached, first rep: allocated +{res['mem_mib'][0][0]:.1f} "
                         f"MiB, reserved +{res['mem_mib'][0][1]:.1f} MiB, for {res['n_binary']:,} binary weights]"
                         if res["mem_mib"] else ""), flush=True)
                if args.bandwidth:
                    report_bandwidth(res, dev)
        if args.profile:
            profile(dev, root, 5)
        if args.cprofile:
            host_profile(dev, root, args.cprofile)


if __name__ == "__main__":
    main()
