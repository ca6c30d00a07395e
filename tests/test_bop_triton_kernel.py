"""Bop's Triton kernel (bnn_probe/optim/bop_triton.py) where Triton is installed, without a GPU: its arithmetic in
Triton's interpreter, and its compiled code for an sm_90 target (ptxas ships with Triton). The CUDA tests in
tests/test_optim_bop.py compare the kernel with the foreach path on a GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def test_interpreted_kernel_is_algorithm_1_on_full_and_tail_blocks_aligned_or_not():
    """Full blocks and tail blocks, tensors on 16-byte boundaries (the hinted variant) and views off them, NaN and
    inf gradient entries: m_t, the flips and the non-finite counts as Algorithm 1 gives them."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("_triton_interpreted.py")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def _ptx(aligned: bool) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bnn_probe.optim import bop_triton as bt

    sig = {"w_tab": "*i64", "m_tab": "*i64", "g_tab": "*i64", "n_tab": "*i64", "blk_tensor": "*i32",
           "blk_start": "*i64", "skipped": "*i64", "one_minus_gamma": "fp32", "gamma": "fp32", "tau": "fp32",
           "inf": "fp32", "BLOCK": "constexpr", "ALIGNED": "constexpr"}
    src = ASTSource(fn=bt._bop_multi, signature=sig, constexprs={"BLOCK": bt.BLOCK, "ALIGNED": aligned},
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(7)})
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    except Exception as e:  # noqa: BLE001 - a Triton without the NVIDIA backend or ptxas
        pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}")
    return compiled.asm["ptx"]


def test_aligned_variant_reads_and_writes_m_in_16_byte_vectors():
    """With every tensor on a 16-byte boundary the full blocks load g, m, w and store m as 4 × float32 vector
    accesses (the kernel is bound by memory traffic); without that promise it uses 4-byte accesses only."""
    aligned, plain = _ptx(True), _ptx(False)
    assert len(re.findall(r"ld\.global(\.\w+)*\.v4\.b32", aligned)) >= 3
    assert len(re.findall(r"st\.global(\.\w+)*\.v4\.b32", aligned)) >= 1
    assert not re.search(r"\.global(\.\w+)*\.v[24]\.", plain)
