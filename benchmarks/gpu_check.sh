#!/usr/bin/env bash
# GPU readiness check for bnn-probe: ONE prepared script, about 5 minutes on an H100/H200, no internet needed.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh        # from the repository root
#
# Uses the machine's preinstalled python3 (torch, pandas, pyarrow, click, scikit-learn, tensorboard, lightning,
# pytest) and the repository through PYTHONPATH: nothing is installed. Every stage has its own timeout and the script
# goes on after a failure; the summary at the end (and $OUT/summary.txt) lists each stage's exit code.
# Outputs in $OUT: gpu_check.log (everything), nvidia-smi.txt, versions.txt, pytest_gpu.txt, bench_probe.txt,
# bench_bop.txt, train_*.txt, runs/ (the short training runs' logs), runs_summary.json, summary.txt.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bnn_probe_gpu_check}"
mkdir -p "$OUT/runs"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
source benchmarks/_stage.sh

# 1. the card and the software
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
nvidia-smi -L | tee -a "$OUT/nvidia-smi.txt"
$PY - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
for m in ("numpy", "pandas", "pyarrow", "click", "sklearn", "tensorboard", "lightning", "triton", "pytest", "bnn_probe"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:  # noqa: BLE001
        print(m, "MISSING", type(e).__name__, e)
EOF

# 2. GPU-marked tests (CUDA autocast bf16/fp16 + GradScaler with the probe, compiled model on CUDA)
stage pytest_gpu 100 pytest_gpu.txt $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_amp_compile.py

# 3. probe overhead and Bop vs Adam on BinaryNet full width
stage build_ext 60 build_ext.txt $PY -c "import setuptools; setuptools.setup()" build_ext --inplace -q
stage bench_probe 110 bench_probe.txt $PY benchmarks/bench_probe.py --device cuda --bandwidth
stage bench_probe_cpu 150 bench_probe_cpu.txt $PY benchmarks/bench_probe.py --threads 1 --cases mlp_digits,wide-mlp --bandwidth
stage bench_bop 80 bench_bop.txt $PY benchmarks/bench_bop.py --device cuda --rounds 15

# 4. short `bnn-probe train` runs on CUDA: fp32, bf16 and fp16 autocast, torch.compile, then --resume
ARGS=(train --device cuda --widths 256,256 --epochs 3 --batch-size 50 --gamma 1e-3 --threshold 1e-6 --no-progress)
stage train_fp32 40 train_fp32.txt $PY -m bnn_probe.cli "${ARGS[@]}" --out "$OUT/runs/fp32"
stage train_bf16 40 train_bf16.txt $PY -m bnn_probe.cli "${ARGS[@]}" --amp bf16 --out "$OUT/runs/bf16"
stage train_fp16 40 train_fp16.txt $PY -m bnn_probe.cli "${ARGS[@]}" --amp fp16 --out "$OUT/runs/fp16"
stage train_compile 70 train_compile.txt $PY -m bnn_probe.cli "${ARGS[@]}" --compile --out "$OUT/runs/compiled"
stage train_resume 30 train_resume.txt $PY -m bnn_probe.cli train --resume "$OUT/runs/fp32" --no-progress

# 5. what the runs recorded: status, steps, flips, accuracy, wall time; dtypes of weights and Bop state
$PY - "$OUT" <<'EOF' 2>&1 | tee "$OUT/runs_summary.txt"
import json, sys
from pathlib import Path
import torch
import bnn_probe
out = Path(sys.argv[1])
summary = {}
for d in sorted((out / "runs").iterdir()):
    try:
        run = bnn_probe.load_run(d)
        tr = run.train
        ck = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=True)
        bop_state = ck["optimizer"]["optimizers"][0]["state"]
        summary[d.name] = {
            "status": run.status, "amp": run.meta["config"].get("amp"), "compile": run.meta["config"].get("compile"),
            "device": run.meta.get("device"), "steps": int(run.steps["step"].max()),
            "flips": int(run.steps["flips"].sum()),
            "val_accuracy": float(tr["val_accuracy"].dropna().iloc[-1]),
            "wall_seconds": float(tr["wall_seconds"].dropna().iloc[-1]),
            "weight_dtypes": sorted({str(v.dtype) for k, v in ck["model"].items() if k.endswith("weight")}),
            "bop_state_dtypes": sorted({str(s["exp_avg"].dtype) for s in bop_state.values()}),
        }
    except Exception as e:  # noqa: BLE001
        summary[d.name] = {"error": f"{type(e).__name__}: {e}"}
    print(d.name, summary[d.name])
(out / "runs_summary.json").write_text(json.dumps(summary, indent=1))
EOF

echo "=== summary ($(( $(date +%s) - T0 ))s total) on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
    | tee "$OUT/summary.txt"
printf '%s\n' "${RESULTS[@]}" | tee -a "$OUT/summary.txt"
