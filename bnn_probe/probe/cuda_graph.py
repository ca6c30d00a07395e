"""CUDA-graph replay of the probe's every-step device measurement (the device path of probe/flat.py on CUDA).

Without graphs, one step of a group costs the concatenations of w_t and m_t, the pure step of probe/fused.py (tens
of eager kernels, or the compiled step's Triton kernels and its Python wrapper) and a launch per output: the GPU
waits on the host's launches. With graphs, a step is: the gradient concatenation and the event sampler's uniforms
into fixed buffers (done by the caller), then **one replay** of a graph that concatenates w_t and m_t (read in place
at fixed addresses), runs the step and packs every output into one byte buffer, and one clone of that buffer (the
rows stay on the device, views of the clone, until the recorder's drain). The arithmetic is the same kernels as
without a graph, so every value is identical.

Capture. The first step with a given key (the cadence flags of the step and the data pointers of every input) runs
normally: it compiles the step (``compile_probe``) and initialises lazily created libraries. The second captures a
graph (``torch.cuda.graph``, thread-local capture mode, one memory pool shared by the group's graphs) and replays it;
later ones replay. A graph reads its inputs at the addresses it captured, so a parameter whose ``.data`` is replaced,
a reloaded optimizer state or re-sampled quantile indices give a new key and the old graphs are dropped. A capture
that fails warns once and that key runs without a graph from then on; inputs that keep moving (more than
``MAX_MOVES`` times) switch graphs off for the group, with one warning.

Anything the caller computes from host values that change between steps must enter the captured function as a
device tensor updated in place (τ, clip values: ``FlatGroup._read_hyper``; the step index ``t``): a Python number
would be baked into the graph.

``capture=False`` runs the same staging, packing and unpacking without a graph (any device): the CPU tests use it to
check that the packed outputs equal the unpacked ones bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["StepGraphs", "pack", "unpack"]

MAX_MOVES = 8  # input address changes tolerated before graphs are switched off for a group

_ALIGN = 8


def _leaves(out: dict) -> list[tuple[str, int | None, Tensor]]:
    """The output's tensors in a fixed order: (key, index in a tuple or None, tensor)."""
    leaves = []
    for k in sorted(out):
        v = out[k]
        if isinstance(v, Tensor):
            leaves.append((k, None, v))
        else:
            leaves.extend((k, i, x) for i, x in enumerate(v))
    return leaves


def pack(out: dict) -> tuple[Tensor, list[tuple[str, int | None, torch.dtype, tuple[int, ...], int, int]]]:
    """All tensors of a step's output as one uint8 buffer (each part 8-byte aligned) and its layout:
    (key, index, dtype, shape, byte offset, bytes) per part."""
    parts, spec, off = [], [], 0
    leaves = _leaves(out)
    dev = leaves[0][2].device if leaves else torch.device("cpu")
    for k, i, x in leaves:
        b = x.contiguous().view(-1).view(torch.uint8)
        nb = b.numel()
        parts.append(b)
        pad = -nb % _ALIGN
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=dev))
        spec.append((k, i, x.dtype, tuple(x.shape), off, nb))
        off += nb + pad
    buf = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=dev)
    return buf, spec


def unpack(buf: Tensor, spec: list) -> dict:
    """The output dict of :func:`pack`'s layout, as views of ``buf`` (no copies)."""
    out: dict[str, Any] = {}
    tuples: dict[str, dict[int, Tensor]] = {}
    for k, i, dtype, shape, off, nb in spec:
        x = buf[off:off + nb].view(dtype).view(shape)
        if i is None:
            out[k] = x
        else:
            tuples.setdefault(k, {})[i] = x
    for k, d in tuples.items():
        out[k] = tuple(d[i] for i in range(len(d)))
    return out


class StepGraphs:
    """The captured graphs of one flat group, one per (cadence flags) at the current input addresses.

    Example (on a CUDA machine; ``fn`` reads and writes only tensors at fixed addresses)::

        graphs = StepGraphs(torch.device("cuda"))
        out = graphs.run((True, False), ptrs, fn)   # 1st: runs fn; 2nd: captures, replays; later: replays
    """

    def __init__(self, device: torch.device, capture: bool | None = None) -> None:
        self.device = device
        self.capture = (device.type == "cuda") if capture is None else bool(capture)
        self.graphs: dict[tuple, tuple[Any, Tensor, list]] = {}
        self.seen: set[tuple] = set()
        self.failed: set[tuple] = set()
        self.ptrs: tuple | None = None
        self.moves = 0
        self.enabled = True
        self.pool = None
        self.captured = 0  # graphs captured so far (benchmarks, tests)
        self.replays = 0

    def run(self, flags: tuple, ptrs: tuple, fn: Callable[[], dict]) -> dict:
        """This step's output of ``fn`` (a dict of tensors / tuples of tensors), through a graph when one applies."""
        if not self.enabled:
            return fn()
        if not self.capture:  # the same packing without a graph (tests)
            buf, spec = pack(fn())
            return unpack(buf.clone(), spec)
        if ptrs != self.ptrs:
            if self.ptrs is not None:
                self.moves += 1
                if self.moves > MAX_MOVES:
                    self._disable(f"its inputs moved {self.moves} times (parameters or optimizer state replaced)")
                    return fn()
            self._drop()
            self.ptrs = ptrs
        if flags in self.failed:
            return fn()
        entry = self.graphs.get(flags)
        if entry is None:
            if flags not in self.seen:  # warm-up: a real step (compiles, initialises libraries)
                self.seen.add(flags)
                return fn()
            entry = self._capture(flags, fn)
            if entry is None:
                return fn()
        graph, buf, spec = entry
        graph.replay()
        self.replays += 1
        return unpack(buf.clone(), spec)

    def _capture(self, flags: tuple, fn: Callable[[], dict]) -> tuple | None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(self.device), \
                    torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                buf, spec = pack(fn())
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: this key runs without a graph
            self.failed.add(flags)
            try:  # let an invalidated capture end before the step runs with ordinary launches
                torch.cuda.synchronize(self.device)
            except Exception:  # noqa: BLE001, S110 - the eager step that follows reports a broken device itself
                pass
            warnings.warn(f"bnn-probe: CUDA graph capture of the probe's step failed for cadence flags {flags}; "
                          f"measuring with ordinary launches for them ({exc!r:.300})", RuntimeWarning, stacklevel=4)
            return None
        self.pool = graph.pool()
        self.captured += 1
        entry = self.graphs[flags] = (graph, buf, spec)
        return entry

    def release(self) -> None:
        """Drop every graph and stop capturing (the probe is closed)."""
        self._drop()
        self.enabled = False

    def _drop(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.failed.clear()
        self.pool = None

    def _disable(self, why: str) -> None:
        self._drop()
        self.enabled = False
        warnings.warn(f"bnn-probe: CUDA graphs of the probe's step switched off: {why}; measuring with ordinary "
                      "launches", RuntimeWarning, stacklevel=4)
