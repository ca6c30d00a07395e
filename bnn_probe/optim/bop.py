"""Bop, the latent-free Binary OPtimizer (Helwegen et al., "Latent Weights Do Not Exist: Rethinking Binarized Neural
Network Optimization", NeurIPS 2019, arXiv 1906.02107; Algorithm 1).

For every binary weight w ∈ {−1, +1}, Bop keeps one real number, the exponential moving average m of its gradient:

    m_t = (1 − γ) · m_{t−1} + γ · g_t            (m_0 = 0, no bias correction)
    w_t = −w_{t−1}   if  w_{t−1} · m_t > τ       (strict: w · m = τ does not flip)
    w_t =  w_{t−1}   otherwise

A gradient entry that is NaN or ±inf is skipped: its m keeps its previous value (a NaN stored in m would stop the
weight from ever flipping again) and ``state[p]["nonfinite_skipped"]`` counts it (:mod:`bnn_probe.optim.nonfinite`).

γ (``gamma``, adaptivity rate) and τ (``threshold``) are per parameter group, so a per-layer threshold is a param
group. Defaults are larq's (γ = 1e-4, τ = 1e-8). Give Bop only the binary weights; real-valued parameters (batch norm,
biases) go to an ordinary optimizer — :class:`bnn_probe.optim.CaseOptimizer` / :func:`bnn_probe.optim.bnn_optimizer`
put both behind one object. Initialise binary weights with :func:`bnn_probe.optim.binary_init_`.

LR schedulers drive γ: in every param group ``"lr"`` is an alias of ``"gamma"`` (writing either writes both; see
``bnn_probe.optim._validate``), so ``StepLR(bop, 100, 0.1)`` decays γ ×0.1 every 100 steps and ``group["gamma"]``
always holds the value in force.

Implementations (chosen like torch's ``foreach``/``fused``). On the CPU all give the same m and the same flips bit
for bit: torch's CPU ``add_(g, alpha=γ)`` rounds γ·g inside one fused multiply-add, as the C step does
(tests/test_optim_bop.py). The compiled GPU kernel may round γ·g differently (last bit of m):

* default (``foreach=None, fused=None``): on the CPU the C step (:mod:`bnn_probe.optim.cstep`, built with the
  probe's extension): one pass over all tensors (read g, m, w; write m, w), non-finite gradient entries skipped and
  counted in the same pass; an attached bnn-probe probe measures inside this pass (docs/quantities.md). On CUDA
  (float32, contiguous) one Triton kernel over all tensors of the group (:mod:`bnn_probe.optim.bop_triton`), which
  skips and counts non-finite entries on the device, so the step has no host synchronisation (the counts reach
  ``state[p]["nonfinite_skipped"]`` at ``state_dict()`` / :meth:`Bop.nonfinite_skipped`). Elsewhere, and on the CPU
  without the extension, the ``foreach`` path.
* ``foreach=False``: a plain Python loop over tensors (``mul_``, ``add_``, one ``torch.where`` per tensor); the
  reference.
* ``foreach=True``: eager ``torch._foreach_*`` ops over all tensors at once, no compiler. On CPU the tensors are
  cut into cache-sized blocks so its 5 elementwise passes run out of cache rather than memory. Bit-identical to the
  loop.
* ``fused=True``: on the CPU the C step; on CUDA (float32) one Triton kernel over all tensors of the device
  (:mod:`bnn_probe.optim.bop_triton`: a pointer table, one launch, γ·g in a fused multiply-add as in the ``foreach``
  path's ``add_(g, alpha=γ)``); elsewhere one ``torch.compile``d call over all tensors of a device and dtype
  (``_foreach`` ops, which Inductor fuses horizontally), compiled once per process on first use (seconds); if
  Triton or compilation is unavailable or fails it warns once and falls back to the next path (compiled, then
  the eager ``foreach`` path).

Example:
    >>> import torch
    >>> from bnn_probe.models import BinaryMLP
    >>> from bnn_probe.nn import binary_parameters
    >>> from bnn_probe.optim import Bop, binary_init_
    >>> model = BinaryMLP(8, [16], 2)
    >>> binary_init_(model, seed=0)  # doctest: +ELLIPSIS
    [...]
    >>> opt = Bop(binary_parameters(model), gamma=1e-3, threshold=1e-6)
    >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)  # drives Bop's γ
    >>> model(torch.randn(4, 8)).pow(2).mean().backward()
    >>> opt.step(); sched.step()
    >>> round(opt.param_groups[0]["gamma"], 12)
    0.0001
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import bop_triton, cstep
from ._validate import GammaAliasOptimizer, check_bop_group, check_hparam
from .cstep import MEASURE_ATTR, MeasureRequest, bop_step_c
from .nonfinite import FINITE_ATTR, STATE_KEY, nonfinite_params, skip_nonfinite

__all__ = ["Bop", "bop_step_loop", "bop_step_foreach", "bop_step_fused"]

# Elements per cache block for the eager CPU path: 2^18 float32 = 1 MiB per tensor, so w, m, g and two temporaries
# of one block fit in a core's L2. Measured in benchmarks/bench_bop.py.
CPU_BLOCK = 1 << 18


class Bop(GammaAliasOptimizer):
    """Bop (Helwegen et al. 2019): flip w iff w · m_t > τ, with m_t = (1 − γ) m_{t−1} + γ g_t.

    Args:
        params: binary weights (±1), or param groups (dicts) with their own ``gamma``/``threshold``.
        gamma: adaptivity rate γ ∈ [0, 1] (``lr`` is an alias, for LR schedulers).
        threshold: flip threshold τ ≥ 0.
        check_binary: at the first step, raise ``ValueError`` if a weight is not exactly ±1.
        foreach: ``True``: the eager multi-tensor path; ``False``: the per-tensor loop; ``None`` (default): the C
            step on the CPU, the Triton kernel on CUDA float32, else foreach.
        fused: the C step on the CPU; the Triton kernel on CUDA float32; elsewhere one compiled call over all
            tensors (``torch.compile``), eager fallback.

    State: ``state[p]["exp_avg"]`` = m; ``state[p]["nonfinite_skipped"]`` = non-finite gradient entries skipped so
    far (present once there was one; on the CUDA kernel path added in at ``state_dict()``, or read it with
    :meth:`nonfinite_skipped`). Class attribute ``bnn_family = "bop"``.
    """

    bnn_family = "bop"

    def __init__(self, params: Iterable[Any], gamma: float = 1e-4, threshold: float = 1e-8, *,
                 check_binary: bool = False, foreach: bool | None = None, fused: bool | None = None) -> None:
        gamma = check_hparam("gamma", gamma, upper=1.0)
        threshold = check_hparam("threshold", threshold)
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True")
        defaults = dict(gamma=gamma, lr=gamma, threshold=threshold, check_binary=bool(check_binary),
                        foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    # --- the step ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One Bop step on every parameter that has a gradient. Returns ``closure()`` when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        requests: list[MeasureRequest] = self.__dict__.pop(MEASURE_ATTR, None) or []  # an attached probe's
        jobs: dict[int, tuple[Tensor, Tensor, Tensor, float, float]] = {}  # the C step's tensors
        rest = []
        for gi, group in enumerate(self.param_groups):
            gamma, threshold = _check_group(group, gi)
            ws, (ms,), gs = self._gather(group, gi, ("exp_avg",))
            if not ws:
                continue
            if _c_step(group) and cstep.usable(ws, ms, gs):
                for w, m, g in zip(ws, ms, gs, strict=True):
                    jobs[id(w)] = (w, m, g, gamma, threshold)
            else:
                rest.append((group, gamma, threshold, ws, ms, gs))
        rest_ids = {id(w) for r in rest for w in r[3]}
        accepted, claimed = [], set()
        for req in requests:  # decided before any weight moves; each weight is stepped once
            if req.param_ids & (rest_ids | claimed):
                req.decline()
            else:
                accepted.append(req)
                claimed |= req.param_ids
        finite: set[int] = set()
        for req in accepted:
            for pid, n_bad in req.run(jobs).items():
                self._count_skipped(jobs.pop(pid), n_bad, finite)
        if jobs:
            todo = list(jobs.values())
            bad_counts = bop_step_c([j[0] for j in todo], [j[1] for j in todo], [j[2] for j in todo],
                                    [j[3] for j in todo], [j[4] for j in todo])
            for job, n_bad in zip(todo, bad_counts, strict=True):
                self._count_skipped(job, n_bad, finite)
        rest = [r for r in rest if not self._triton_step(*r)]  # CUDA float32: one kernel, no synchronisation
        bad = nonfinite_params(self, [w for r in rest for w in r[3]])  # NaN/±inf entries are skipped
        self.__dict__[FINITE_ATTR] = self.__dict__.get(FINITE_ATTR, frozenset()) | finite
        for group, gamma, threshold, ws, ms, gs in rest:
            ws, (ms,), gs = skip_nonfinite(self, ws, [ms], gs, _masked(gamma, threshold), bad)
            if not ws:
                continue
            if group["fused"]:
                bop_step_fused(ws, ms, gs, gamma, threshold)
            elif group["foreach"] is False:
                bop_step_loop(ws, ms, gs, gamma, threshold)
            else:
                bop_step_foreach(ws, ms, gs, gamma, threshold)
        return loss

    def _triton_step(self, group: dict[str, Any], gamma: float, threshold: float, ws: list[Tensor],
                     ms: list[Tensor], gs: list[Tensor]) -> bool:
        """The default and ``fused=True`` on CUDA float32 tensors: one Triton launch (optim/bop_triton.py) that also
        skips and counts non-finite gradient entries on the device; False where it does not apply."""
        if not _c_step(group) or not bop_triton.eligible(ws, ms, gs):
            return False
        key = tuple(id(w) for w in ws)
        slot = self._device_skips.get(key)
        if slot is None:
            slot = self._device_skips[key] = (ws, torch.zeros(len(ws), dtype=torch.int64, device=ws[0].device))
        return bop_triton.launch(ws, ms, gs, gamma, threshold, slot[1])  # (eligible: checked above)

    @property
    def _device_skips(self) -> dict[tuple[int, ...], tuple[list[Tensor], Tensor]]:
        d = self.__dict__.get("_device_skip_counts")
        if d is None:
            d = self.__dict__["_device_skip_counts"] = {}
        return d

    def _fold_device_skips(self) -> None:
        """Add the device-side counts of skipped non-finite entries (Triton path) to ``state[p]["nonfinite_skipped"]``
        (one host synchronisation)."""
        for ws, counts in self._device_skips.values():
            if not counts.any():
                continue
            for w, n in zip(ws, counts.tolist(), strict=True):
                if n:
                    st = self.state[w]
                    st[STATE_KEY] = int(st.get(STATE_KEY, 0)) + int(n)
            counts.zero_()

    def nonfinite_skipped(self, p: Tensor) -> int:
        """Non-finite gradient entries of ``p`` skipped so far (``state[p]["nonfinite_skipped"]`` with the counts the
        CUDA kernel keeps on the device added in)."""
        self._fold_device_skips()
        return int(self.state[p].get(STATE_KEY, 0)) if p in self.state else 0

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, after adding the device-side non-finite counts into the state (CUDA)."""
        self._fold_device_skips()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``; counts not yet folded belong to the replaced state and are dropped."""
        self.__dict__.pop("_device_skip_counts", None)
        super().load_state_dict(state_dict)

    def _count_skipped(self, job: tuple, n_bad: int, finite: set[int]) -> None:
        if n_bad:
            st = self.state[job[0]]
            st[STATE_KEY] = int(st.get(STATE_KEY, 0)) + int(n_bad)
        else:
            finite.add(id(job[0]))


def _c_step(group: dict[str, Any]) -> bool:
    """The group takes the C step where its tensors allow: the default and ``fused=True`` (on the CPU)."""
    return bool(group["fused"]) or (group["foreach"] is None and group["fused"] is None)


def _check_group(group: dict[str, Any], index: int | None = None) -> tuple[float, float]:
    _, gamma, threshold = check_bop_group(group, index, "Bop")
    return gamma, threshold


def _masked(gamma: float, threshold: float) -> Callable[[Tensor, list[Tensor], Tensor, Tensor], None]:
    """The loop step for a tensor holding non-finite gradient entries: m unchanged where ``ok`` is False."""

    def step(w: Tensor, states: list[Tensor], g: Tensor, ok: Tensor) -> None:
        (m,) = states
        m.copy_(torch.where(ok, m.mul(1.0 - gamma).add_(g, alpha=gamma), m))
        w.copy_(torch.where(w * m > threshold, -w, w))

    return step


# --- implementations (functional; all update ws and ms in place) -----------------------------------------------------
def bop_step_loop(ws: list[Tensor], ms: list[Tensor], gs: list[Tensor], gamma: float, threshold: float) -> None:
    """Reference: one tensor at a time, ``m ← (1−γ)m + γg``; ``w ← where(w·m > τ, −w, w)``."""
    for w, m, g in zip(ws, ms, gs, strict=True):
        m.mul_(1.0 - gamma).add_(g, alpha=gamma)
        w.copy_(torch.where(w * m > threshold, -w, w))


def _foreach_wave(ws: list[Tensor], ms: list[Tensor], gs: list[Tensor], gamma: float, threshold: float) -> None:
    torch._foreach_mul_(ms, 1.0 - gamma)
    torch._foreach_add_(ms, gs, alpha=gamma)
    # flag = [w·m > τ] as 0./1., then w ← w − 2·w·flag, i.e. −w where flagged (exact for any w).
    x = torch._foreach_mul(ws, ms)
    if ws[0].device.type == "cpu":  # one in-place compare per block (fewest passes; blocks are few and large)
        for xc in x:
            xc.gt_(threshold)
    else:  # all-foreach: [x − τ > 0] = clamp(sign(x − τ), min=0); with gradual underflow fl(a − b) > 0 ⇔ a > b
        torch._foreach_sub_(x, threshold)
        torch._foreach_sign_(x)
        torch._foreach_clamp_min_(x, 0.0)
    torch._foreach_addcmul_(ws, ws, x, value=-2.0)


def bop_step_foreach(ws: list[Tensor], ms: list[Tensor], gs: list[Tensor], gamma: float, threshold: float,
                     block: int = CPU_BLOCK) -> None:
    """Eager multi-tensor Bop step. CPU tensors are processed in waves of contiguous blocks of about ``block``
    elements (cache blocking); other devices in one wave of whole tensors."""
    cpu = [i for i, w in enumerate(ws) if w.device.type == "cpu"]
    other = [i for i, w in enumerate(ws) if w.device.type != "cpu"]
    if other:
        _foreach_wave([ws[i] for i in other], [ms[i] for i in other], [gs[i] for i in other], gamma, threshold)
    wave: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    size = 0
    for i in cpu:
        w, m, g = ws[i], ms[i], gs[i]
        if w.numel() > block and w.is_contiguous() and m.is_contiguous() and g.is_contiguous():
            parts = zip(w.view(-1).split(block), m.view(-1).split(block), g.view(-1).split(block), strict=True)
        else:
            parts = [(w, m, g)]
        for wp, mp, gp in parts:
            wave[0].append(wp)
            wave[1].append(mp)
            wave[2].append(gp)
            size += wp.numel()
            if size >= block:
                _foreach_wave(*wave, gamma, threshold)
                wave, size = ([], [], []), 0
    if size:
        _foreach_wave(*wave, gamma, threshold)


def _bop_kernel_multi(ws: list[Tensor], ms: list[Tensor], gs: list[Tensor], one_minus_gamma: Tensor, gamma: Tensor,
                      threshold: Tensor) -> None:
    """Algorithm 1 over a list of flat tensors in one graph: m_t = (1 − γ) m_{t−1} + γ g_t with ``_foreach`` ops,
    which Inductor lowers to horizontally fused kernels (few launches for many tensors on a GPU, as for its compiled
    foreach optimizers), then w_t = −w_{t−1} where w_{t−1} · m_t > τ."""
    m_new = torch._foreach_add(torch._foreach_mul(ms, one_minus_gamma), torch._foreach_mul(gs, gamma))
    w_new = [torch.where(w * m > threshold, -w, w) for w, m in zip(ws, m_new, strict=True)]
    torch._foreach_copy_(ms, m_new)
    torch._foreach_copy_(ws, w_new)


class CompiledKernel:
    """A ``torch.compile``d in-place kernel with a process-wide fallback: the first failure to compile or run warns
    once and makes :meth:`__call__` return False from then on, so callers use their eager path."""

    def __init__(self, fn: Callable[..., None], name: str) -> None:
        self.fn, self.name = fn, name
        self.compiled: Callable[..., None] | None = None
        self.error: str | None = None

    def __call__(self, *args: Any) -> bool:
        if self.error is not None:
            return False
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.fn, dynamic=True, fullgraph=True)
            self.compiled(*args)
            return True
        except Exception as e:  # no C++ compiler, no Triton, unsupported platform, …
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            warnings.warn(f"{self.name}(fused=True): torch.compile is unavailable ({self.error}); "
                          f"using the eager foreach path instead", RuntimeWarning, stacklevel=3)
            return False


_FUSED_BOP = CompiledKernel(_bop_kernel_multi, "Bop")


def _scalars(like: Tensor, *values: float) -> list[Tensor]:
    return [torch.tensor(v, dtype=like.dtype, device=like.device) for v in values]


def bop_step_fused(ws: list[Tensor], ms: list[Tensor], gs: list[Tensor], gamma: float, threshold: float) -> None:
    """One compiled call per (device, dtype) over all its tensors' flat views (``_bop_kernel_multi``; γ and τ enter
    as 0-d tensors, so a schedule does not recompile); falls back to :func:`bop_step_foreach` when compiling is
    unavailable. Non-contiguous tensors take the loop path."""
    by_key: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor], list[Tensor]]] = {}
    for w, m, g in zip(ws, ms, gs, strict=True):
        if not (w.is_contiguous() and m.is_contiguous() and g.is_contiguous()):
            bop_step_loop([w], [m], [g], gamma, threshold)
            continue
        parts = by_key.setdefault((w.device, w.dtype), ([], [], []))
        parts[0].append(w.view(-1))
        parts[1].append(m.view(-1))
        parts[2].append(g.view(-1))
    for fw, fm, fg in by_key.values():
        if bop_triton.step(fw, fm, fg, gamma, threshold):  # CUDA float32: one Triton launch (optim/bop_triton.py)
            continue
        if not _FUSED_BOP(fw, fm, fg, *_scalars(fw[0], 1.0 - gamma, gamma, threshold)):
            bop_step_foreach(fw, fm, fg, gamma, threshold)


Bop.validate_group = staticmethod(_check_group)
