#!/usr/bin/env bash
# The probe-overhead device check (CUDA graphs of the probe's step, Bop's Triton kernel): ONE prepared script,
# about 5 minutes on an H100/H200, nothing installed (the machine's python3 with torch and Triton; the repository
# through PYTHONPATH).
#
#   OUT=/some/folder bash benchmarks/gpu_overhead.sh      # from the repository root
#
# Stages (each with its own time limit; the script goes on after a failure and prints every stage's exit code):
# GPU tests of the graphs and the kernel, the kernel's interpreter and PTX tests, bench_probe with graphs on and off in one process (+ a cProfile of 200
# probe-on MLP steps), bench_bop (Bop vs Adam(foreach) on BinaryNet shapes), the older GPU tests, a short
# `bnn-probe train --device cuda`.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/bnn_probe_gpu_overhead}"
mkdir -p "$OUT"
source benchmarks/_stage.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

TAIL=8 stage tests_new 120 tests_new.txt $PY -m pytest -q -m gpu -p no:cacheprovider -W ignore::DeprecationWarning \
    tests/test_cuda_graph.py tests/test_optim_bop.py
TAIL=4 stage triton_kernel 40 triton_kernel.txt $PY -m pytest -q -p no:cacheprovider tests/test_bop_triton_kernel.py
TAIL=12 stage bench_probe 160 bench_probe.txt $PY benchmarks/bench_probe.py --device cuda --bandwidth --reps 7 \
    --variants '[{}, {"cuda_graphs": false}]' --cprofile mlp
TAIL=14 stage bench_bop 50 bench_bop.txt $PY benchmarks/bench_bop.py --device cuda --rounds 15
TAIL=6 stage tests_old 45 tests_old.txt $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_amp_compile.py
TAIL=6 stage train 45 train.txt $PY -m bnn_probe.cli train --device cuda --widths 256,256 --epochs 3 \
    --batch-size 50 --no-progress --out /tmp/bnn_probe_gpu_train

echo "=== summary ($(( $(date +%s) - T0 ))s total)"
printf '%s\n' "${RESULTS[@]}" | tee "$OUT/summary.txt"
