"""Run bnn_probe.optim.bop_triton's kernel in Triton's interpreter (TRITON_INTERPRET=1: numpy on CPU tensors) and
compare it with Algorithm 1 of Helwegen et al. (2019). Started in a subprocess by tests/test_bop_triton_kernel.py,
because the interpreter is chosen when the kernel is defined, at import. Exits non-zero on a mismatch.

The interpreter does not promise the GPU's fused multiply-add, so each m_t must equal either
fma(γ, g, fl((1 − γ) m)) or fl(fl((1 − γ) m) + fl(γ g)); the flips are checked against the kernel's own m_t. The
GPU tests compare the compiled kernel with the foreach path bit for bit.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from bnn_probe.optim import bop_triton as bt  # noqa: E402

GAMMA, TAU = 1e-3, 1e-6


def check(ns: list[int], offset: int, seed: int) -> tuple[bool, int]:
    """One launch over tensors of sizes ``ns``, each a view ``offset`` elements into its storage (offset % 4 != 0:
    not on a 16-byte boundary, the unhinted variant); returns (the table's ``aligned``, number of flips)."""
    gen = torch.Generator().manual_seed(seed)

    def view(scale: float) -> list[torch.Tensor]:
        return [(torch.randn(n + offset, generator=gen) * scale)[offset:] for n in ns]

    ws = [w.sign() for w in view(1.0)]
    ms, gs = view(1e-3), view(1e-2)
    for g in gs:  # non-finite entries in a full block (n ≥ BLOCK) and in a tail block
        g[3], g[len(g) - 1] = float("nan"), -float("inf")
    w0, m0 = [w.clone() for w in ws], [m.clone() for m in ms]
    tab = bt._Tables(tuple(ns), torch.device("cpu"))
    ptrs = tab.pointers(ws, ms, gs)
    skipped = torch.zeros(len(ns), dtype=torch.int64)
    bt._bop_multi[(tab.blocks,)](ptrs[0], ptrs[1], ptrs[2], tab.n, tab.blk_tensor, tab.blk_start, skipped,
                                 1.0 - GAMMA, GAMMA, TAU, float("inf"), BLOCK=bt.BLOCK, ALIGNED=tab.aligned)
    one_minus = torch.tensor(1.0 - GAMMA, dtype=torch.float64).float()
    gamma = torch.tensor(GAMMA, dtype=torch.float64).float()
    flips = 0
    for w, m, g, wb, mb in zip(ws, ms, gs, w0, m0, strict=True):
        ok = g.abs() < float("inf")
        decayed = mb * one_minus
        fused = (decayed.double() + g.double() * gamma.double()).float()  # γ·g exact in float64: one rounding
        plain = decayed + g * gamma
        assert torch.equal(m[~ok], mb[~ok]), "a non-finite gradient entry changed m"
        assert bool(((m == fused) | (m == plain))[ok].all()), "m_t is not (1 − γ) m + γ g"
        assert torch.equal(w, torch.where(wb * m > TAU, -wb, wb)), "the flips are not those of w · m_t > τ"
        flips += int((w != wb).sum())
    assert skipped.tolist() == [2] * len(ns), f"non-finite counts {skipped.tolist()}"
    return tab.aligned, flips


def main() -> None:
    bt._to_device = lambda values, dtype, device: torch.tensor(values, dtype=dtype)  # CPU tables, no pinning
    B = bt.BLOCK
    seen = set()
    for ns, offset in [([2 * B + 5, B, 17], 0), ([2 * B + 5, B, 17], 1), ([3 * B], 2), ([B + 64, 64], 4)]:
        aligned, flips = check(ns, offset, seed=offset)
        assert aligned == (offset % 4 == 0), (ns, offset, aligned)
        assert flips > 0
        seen.add(aligned)
    assert seen == {True, False}
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
