"""Bop's step on CUDA as one Triton kernel over all tensors of a (device, float32) group: a multi-tensor kernel.

Helwegen et al. (2019), Algorithm 1, per weight i of every tensor of the group:

    m_t = (1 − γ) m_{t−1} + γ g_t          (one fused multiply-add: fma(γ, g_t, fl((1 − γ) m_{t−1})))
    w_t = −w_{t−1}  if  w_{t−1} · m_t > τ,  else  w_{t−1}

Non-finite gradient entries are skipped inside the kernel (m keeps its value, as in the other paths'
:func:`bnn_probe.optim.nonfinite.skip_nonfinite`) and counted per tensor in a device counter, so this path has no
host synchronisation per step; :class:`bnn_probe.optim.Bop` adds the counts to ``state[p]["nonfinite_skipped"]``
at ``state_dict()`` and :meth:`~bnn_probe.optim.Bop.nonfinite_skipped`.

One launch reads g, m, w (12 bytes per weight) and writes m (4 bytes) and only the flipped weights: the program of
block b finds its tensor and its first element in two small tables (block → tensor, block → start), and the
tensor's data pointers in a pointer table (one int64 per tensor and role, rebuilt when a pointer changes — gradients
are new tensors every step under ``zero_grad(set_to_none=True)``, so it is one small host → device copy per step).
A block that lies wholly inside its tensor (all but each tensor's last) loads g, m, w and stores m without a mask;
where every pointer of the table is on a 16-byte boundary (``_Tables.aligned``, always so for tensors of their own
from torch's allocators; views into a storage may not be), the kernel is told so and those accesses become 4-wide
vector loads and stores (tests/test_bop_triton_kernel.py reads the compiled code). Tail blocks and unaligned tables
use masked 4-byte accesses.
γ, 1 − γ and τ are kernel arguments rounded to float32, as torch's CUDA kernels round their scalar arguments, and
γ·g enters one fused multiply-add as in torch's ``add_(g, alpha=γ)``: the same m and flips as the ``foreach`` path
(tests/test_optim_bop.py, on CUDA).

:func:`step` returns False (and the caller takes another path) where Triton is not installed, the tensors are not
CUDA float32, or the kernel failed once (one warning, then never again in this process).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["available", "eligible", "launch", "step"]

BLOCK = 2048

try:  # pragma: no cover - Triton exists on CUDA machines only
    import triton
    import triton.language as tl

    @triton.jit
    def _bop_block(wp, mp, gp, offs, inside, one_minus_gamma, gamma, tau, inf, FULL: tl.constexpr):  # noqa: N803
        """Algorithm 1 on one block; returns its number of non-finite gradient entries. ``FULL``: every element
        of the block lies inside the tensor, so loads and the store of m take no mask and can be vector accesses."""
        if FULL:
            g = tl.load(gp + offs)
            m = tl.load(mp + offs)
            w = tl.load(wp + offs)
        else:
            g = tl.load(gp + offs, mask=inside, other=0.0)
            m = tl.load(mp + offs, mask=inside, other=0.0)
            w = tl.load(wp + offs, mask=inside, other=0.0)
        ok = tl.abs(g) < inf  # NaN and ±inf entries: no gradient at this step (m kept), counted
        m = tl.where(ok, tl.fma(g, gamma, m * one_minus_gamma), m)
        if FULL:  # a skipped entry stores its own m back: one unmasked (vector) store
            tl.store(mp + offs, m)
            tl.store(wp + offs, -w, mask=w * m > tau)  # only the flipped weights are written
            return tl.sum((ok == 0).to(tl.int64), axis=0)
        else:
            tl.store(mp + offs, m, mask=inside)
            tl.store(wp + offs, -w, mask=inside & (w * m > tau))
            return tl.sum((inside & (ok == 0)).to(tl.int64), axis=0)

    @triton.jit
    def _bop_multi(w_tab, m_tab, g_tab, n_tab, blk_tensor, blk_start, skipped, one_minus_gamma, gamma, tau, inf,
                   BLOCK: tl.constexpr, ALIGNED: tl.constexpr):  # noqa: N803 - Triton's constexpr convention
        pid = tl.program_id(0)
        t = tl.load(blk_tensor + pid)
        start = tl.multiple_of(tl.load(blk_start + pid), BLOCK)  # blocks start at multiples of BLOCK
        n = tl.load(n_tab + t)
        wp = tl.load(w_tab + t).to(tl.pointer_type(tl.float32))
        mp = tl.load(m_tab + t).to(tl.pointer_type(tl.float32))
        gp = tl.load(g_tab + t).to(tl.pointer_type(tl.float32))
        if ALIGNED:  # every tensor starts on a 16-byte boundary (checked by the caller): 4-wide vector accesses
            wp = tl.multiple_of(wp, 16)
            mp = tl.multiple_of(mp, 16)
            gp = tl.multiple_of(gp, 16)
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n
        if start + BLOCK <= n:
            bad = _bop_block(wp, mp, gp, offs, inside, one_minus_gamma, gamma, tau, inf, FULL=True)
        else:
            bad = _bop_block(wp, mp, gp, offs, inside, one_minus_gamma, gamma, tau, inf, FULL=False)
        if bad > 0:
            tl.atomic_add(skipped + t, bad)

    _IMPORT_ERROR: str | None = None
except Exception as e:  # noqa: BLE001 - no Triton (CPU builds of torch), or an incompatible one
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"

_failed: str | None = None


def _to_device(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A host list as a device tensor without a host synchronisation (pinned memory, asynchronous copy; torch's
    pinned-memory allocator keeps the host buffer until the copy is done)."""
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


class _Tables:
    """Block tables of one list of tensor sizes, and the last pointer table (device int64)."""

    def __init__(self, ns: tuple[int, ...], device: torch.device) -> None:
        bt, bs = [], []
        for i, n in enumerate(ns):
            for s in range(0, n, BLOCK):
                bt.append(i)
                bs.append(s)
        self.blocks = len(bt)
        self.n = _to_device(ns, torch.int64, device)
        self.blk_tensor = _to_device(bt, torch.int32, device)
        self.blk_start = _to_device(bs, torch.int64, device)
        self.ptr_key: tuple[int, ...] | None = None
        self.ptrs: Tensor | None = None
        self.aligned = False  # every pointer of the table on a 16-byte boundary
        self.scratch: Tensor | None = None  # counts of a caller that keeps none (entries already filtered out)

    def pointers(self, ws: list[Tensor], ms: list[Tensor], gs: list[Tensor]) -> Tensor:
        key = tuple(t.data_ptr() for t in (*ws, *ms, *gs))
        if key != self.ptr_key:
            self.ptrs = _to_device(key, torch.int64, self.n.device).view(3, len(ws))
            self.ptr_key = key
            self.aligned = all(p % 16 == 0 for p in key)
        return self.ptrs


_tables: dict[tuple, _Tables] = {}


def available() -> bool:
    """Triton imported and no kernel failure so far in this process."""
    return _IMPORT_ERROR is None and _failed is None


def eligible(ws: list[Tensor], ms: list[Tensor], gs: list[Tensor]) -> bool:
    """The kernel applies: Triton works, and every tensor is a contiguous float32 tensor on one CUDA device."""
    if not available() or not ws:
        return False
    dev = ws[0].device
    return dev.type == "cuda" and all(t.dtype == torch.float32 and t.device == dev and t.is_contiguous()
                                      for t in (*ws, *ms, *gs))


def step(ws: list[Tensor], ms: list[Tensor], gs: list[Tensor], gamma: float, threshold: float,
         skipped: Tensor | None = None) -> bool:
    """One Bop step over the tensors (:func:`eligible`) in one launch, no host synchronisation. Non-finite gradient
    entries are skipped (m unchanged, the sign decided by it as usual) and added to ``skipped[i]`` (int64, one per
    tensor, on the device; None: not kept, for callers that filtered them out before). False when this path does
    not apply or the kernel failed (warned once; nothing was changed)."""
    return eligible(ws, ms, gs) and launch(ws, ms, gs, gamma, threshold, skipped)


def launch(ws: list[Tensor], ms: list[Tensor], gs: list[Tensor], gamma: float, threshold: float,
           skipped: Tensor | None = None) -> bool:
    """:func:`step` for tensors the caller found :func:`eligible` (the check is not repeated)."""
    global _failed
    dev = ws[0].device
    ns = tuple(w.numel() for w in ws)
    key = (dev, ns)
    tab = _tables.get(key)
    if tab is None:
        if len(_tables) > 64:
            _tables.clear()
        tab = _tables[key] = _Tables(ns, dev)
    if tab.blocks == 0:
        return True
    if skipped is None:
        if tab.scratch is None:
            tab.scratch = torch.zeros(len(ws), dtype=torch.int64, device=dev)
        skipped = tab.scratch
    try:
        ptrs = tab.pointers(ws, ms, gs)
        with torch.cuda.device(dev):
            _bop_multi[(tab.blocks,)](ptrs[0], ptrs[1], ptrs[2], tab.n, tab.blk_tensor, tab.blk_start, skipped,
                                      1.0 - gamma, gamma, threshold, float("inf"), BLOCK=BLOCK,
                                      ALIGNED=tab.aligned, num_warps=8)
    except Exception as e:  # noqa: BLE001 - an incompatible Triton or driver: warn once, the caller falls back
        _failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"Bop(fused=True): the Triton kernel failed ({_failed}); using the compiled/foreach path "
                      "instead", RuntimeWarning, stacklevel=3)
        return False
    return True
