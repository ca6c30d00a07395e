"""Run checks: conditions under which the probe's numbers describe something other than the user thinks.

Each finding is a warning ``{"kind", "layer", "step", "message"}`` (one per kind and layer, the first step it was
seen), written to meta.json ``"warnings"`` (docs/runlog-format.md) and shown by ``bnn-probe summary`` and the report.
Kinds:

* ``not_binarized`` — a selected parameter goes unchanged (or only reshaped/cast) into a linear/convolution/matmul/
  normalisation op in its module's first forward pass after attach: it is not used through a binarizer (a too-broad
  ``binary=`` selection). Only uses inside the owning module's forward are seen.
* ``dead_gradients`` — in ≥ 90 % of ≥ 3 check steps the layer's gradient is exactly 0 everywhere, or (Bop family,
  τ > 0) max|m| ≤ 1e-6·τ: no weight can flip (e.g. a clipped straight-through estimator on ±1 weights).
* ``non_binary_weights`` — a Bop-family layer whose weights are not all ±1, or whose forward pass multiplies b(w)
  by a scale ≠ 1 (w·m > τ then does not compare the forward weight's momentum with τ).
* ``changed_outside_step`` — the weights differ between the measurement after step t and the pre-step hook of
  step t + 1 (a clamp, an in-place quantizer or a manual edit outside ``optimizer.step()``): the logged w̃ and
  |w̃| quantiles are read before that change.
* ``nonfinite_state`` — NaN/Inf in a tensor of the optimizer state of the layer.
* ``binarizer_zeros`` — the binarizer maps some weights to 0 (``torch.sign``): counted as −1 by the flips.
* ``undeclared_bop`` — at attach, a layer measured as latent has only ±1 weights and an optimizer from outside
  ``torch.optim``: probably a Bop-like optimizer the probe was not told about (``attach(..., family="bop",
  momentum_key=...)``); its inertia and |w̃| columns then describe nothing.

Checks run on the ``check_every`` cadence (device tensors, read at each flush); the forward-pass check runs once.
On the CPU, a Bop-family layer with the sign binarizer and contiguous float tensors gets its statistics from one
compiled pass over w, m and g (``bnnp_check`` in probe/_pass_tmpl.h; the same values as the torch expressions), and
the comparison of the weights with their copy from one compiled count per layer (``bnnp_count_ne``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import cpu_pass
from .binarizers import Sign
from .binary_detect import BOP_FAMILIES, LayerInfo

__all__ = ["RunChecks", "WARNING_KINDS"]

WARNING_KINDS = ("not_binarized", "dead_gradients", "non_binary_weights", "changed_outside_step", "nonfinite_state",
                 "binarizer_zeros", "undeclared_bop")
#: ops (by name: function, method or operator) that consume a weight as is: a parameter passed to one of them
#: directly, or only reshaped/cast (:data:`_SAME_VALUES`), is not binarized
_RAW_OPS = {"linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
            "conv_transpose3d", "batch_norm", "layer_norm", "group_norm", "instance_norm", "embedding", "matmul",
            "__matmul__", "__rmatmul__", "mm", "addmm", "bmm", "baddbmm", "einsum", "tensordot"}
_SAME_VALUES = {"t", "T", "mT", "transpose", "view", "reshape", "permute", "contiguous", "to", "float", "double",
                "half", "bfloat16", "expand", "unsqueeze", "squeeze", "flatten", "__getitem__"}
_DEAD_FRACTION, _DEAD_MIN_CHECKS, _DEAD_M_REL = 0.9, 3, 1e-6


class _RawUse(TorchFunctionMode):
    """Records which of ``params`` are passed unchanged (or only reshaped/cast, :data:`_SAME_VALUES`) to an op of
    :data:`_RAW_OPS`. Derived tensors are kept alive until the mode exits, so their ids are not reused meanwhile."""

    def __init__(self, params: dict[int, str]) -> None:
        super().__init__()
        self.params, self.raw = dict(params), set()
        self._keep: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        names = [self.params[id(a)] for a in (*args, *kwargs.values()) if id(a) in self.params]
        op = getattr(func, "__name__", "")
        if op == "__get__":  # a property such as Tensor.T
            op = getattr(getattr(func, "__self__", None), "__name__", "")
        if names and op in _RAW_OPS:
            self.raw.update(names)
        out = func(*args, **kwargs)
        if names and op in _SAME_VALUES and isinstance(out, Tensor):
            self.params[id(out)] = names[0]
            self._keep.append(out)
        return out


class RunChecks:
    """The checks of one probe (see the module docstring); ``warnings`` is what meta.json records."""

    def __init__(self, layers: list[LayerInfo], groups: list, schedule: Callable[[int], bool]) -> None:
        """``groups``: the probe's FlatGroups (their ``wbuf`` holds w_t after each measurement); ``schedule``: the
        ``check_every`` cadence."""
        self.layers, self.groups, self.schedule = layers, groups, schedule
        self.warnings: list[dict[str, Any]] = []
        self._seen: set[tuple[str, str]] = set()
        self._stats: list[tuple[int, Tensor]] = []
        self._changed: list[tuple[int, Tensor]] = []
        self._scales: list[tuple[int, int, Tensor]] = []
        self._dead = [[0, 0] for _ in layers]  # [dead checks, checks] per layer
        self.pending_change = 0
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ recording
    def warn(self, kind: str, layer: str, step: int, message: str) -> None:
        if (kind, layer) in self._seen:
            return
        self._seen.add((kind, layer))
        self.warnings.append({"kind": kind, "layer": layer, "step": int(step), "message": message})

    def restore(self, warnings: object) -> None:
        """Keep the warnings of an earlier segment of a resumed run (its meta.json), skipping malformed entries."""
        for w in warnings if isinstance(warnings, list) else []:
            if isinstance(w, dict) and isinstance(w.get("kind"), str) and isinstance(w.get("layer"), str):
                step = w.get("step")
                self.warn(w["kind"], w["layer"], step if isinstance(step, int) else 0, str(w.get("message", "")))

    # ------------------------------------------------------------------ at attach
    def at_attach(self, model: nn.Module) -> None:
        """Static checks, and the one-shot forward hooks of the ``not_binarized`` check."""
        for ly in self.layers:
            w = ly.param.detach()
            if ly.family == "latent" and not type(ly.optimizer).__module__.startswith("torch.optim") and w.numel() \
                    and bool((w.abs() == 1).all()):
                self.warn("undeclared_bop", ly.name, 0,
                          f"all weights are ±1 and {type(ly.optimizer).__name__} is not a torch optimizer: if it flips "
                          "weights Bop-style, attach(..., family='bop', momentum_key=..., threshold_key=...) says so")
            if ly.family in BOP_FAMILIES:
                s = ly.binarizer.scale(ly.param.detach())
                if s is not None and bool(((s - 1).abs() > 1e-6).any()):
                    self.warn("non_binary_weights", ly.name, 0,
                              f"the forward pass uses {float(s.mean()):.4g}·b(w) under {type(ly.optimizer).__name__}:"
                              " w·m > τ compares the momentum of ±1, not of the forward weight, with τ")
        by_module: dict[int, tuple[nn.Module, dict[int, str]]] = {}
        for ly in self.layers:
            if ly.module is not None:
                by_module.setdefault(id(ly.module), (ly.module, {}))[1][id(ly.param)] = ly.name
        for module, params in by_module.values():
            self._hook(module, params)

    def _hook(self, module: nn.Module, params: dict[int, str]) -> None:
        state: dict[str, Any] = {}

        def pre(mod, args):
            if torch.compiler.is_compiling():  # traced by torch.compile: check an eager call instead
                return
            state["mode"] = _RawUse(params)
            state["mode"].__enter__()

        def post(mod, args, output):
            mode = state.pop("mode", None)
            if mode is None:
                return
            mode.__exit__(None, None, None)
            for h in handles:
                h.remove()
            for name in sorted(mode.raw):
                self.warn("not_binarized", name, 0,
                          f"{name} ({type(mod).__name__}) goes unchanged into a linear/convolution/normalisation op in "
                          "the forward pass: it is not binarized there; narrow binary= or give its binarizer=")

        handles = [module.register_forward_pre_hook(pre), module.register_forward_hook(post, always_call=True)]
        self._hooks.extend(handles)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def declared_change(self) -> None:
        """The weights were changed on purpose since the last measurement (``Probe.mark_intervention``): the
        pending ``changed_outside_step`` comparison is dropped."""
        self.pending_change = 0

    # ------------------------------------------------------------------ per step (check cadence only)
    def pre_step(self) -> None:
        """Before step t + 1: did the weights change since the measurement of a check step t?"""
        if not self.pending_change:
            return
        t, self.pending_change = self.pending_change, 0
        parts: list[Tensor] = [None] * len(self.layers)  # type: ignore[list-item]
        for g in self.groups:
            refs = [g.layer_slice(g.wbuf, k) for k in range(len(g.rows))]
            counts = [_count_changed(ly.param.detach(), ref) for ly, ref in zip(g.layers, refs, strict=True)]
            diff = g.cat_w() != g.wbuf if None in counts else None
            for k, li in enumerate(g.rows):
                parts[li] = torch.tensor(counts[k]) if counts[k] is not None else g.layer_slice(diff, k).sum()
        self._changed.append((t, torch.stack([p.to(parts[0].device) for p in parts])))

    def post_step(self, t: int, due: bool | None = None) -> None:
        """After step t: record the device statistics of the checks (no host synchronisation). ``due``: whether
        t is a check step, when the caller has asked the schedule already."""
        if not (self.schedule(t) if due is None else due):
            return
        self.pending_change = t
        for g in self.groups:  # w_t, compared with the weights before the next step (pre_step)
            g.keep_weights()
        rows = []
        for ly in self.layers:
            w = ly.param.detach()
            g = ly.param.grad
            st = ly.optimizer.state.get(ly.param, {})
            row = _compiled_row(ly, w, g, st)
            if row is not None:
                rows.append(row)
                self._scale(t, ly, w)
                continue
            nan = torch.tensor(math.nan, dtype=torch.float64, device=w.device)
            max_g = g.detach().abs().max().double() if g is not None and g.numel() else nan
            max_m = nan
            if ly.family in BOP_FAMILIES:
                m = st.get(ly.extra.get("momentum_key", "exp_avg"))
                if isinstance(m, Tensor) and m.numel():
                    max_m = m.detach().abs().max().double()
            bad = sum((~torch.isfinite(v.detach())).sum() for v in st.values()
                      if isinstance(v, Tensor) and v.is_floating_point())
            bad = torch.as_tensor(bad, device=w.device).double()
            non_pm1 = (w.abs() != 1).sum().double() if ly.family in BOP_FAMILIES else nan
            z = ly.binarizer.zeros(w)
            zeros = z.sum().double() if z is not None else nan
            rows.append(torch.stack([max_g, max_m, bad.to(max_g.device), non_pm1, zeros]))
            self._scale(t, ly, w)
        self._stats.append((t, torch.stack([r.to(rows[0].device) for r in rows])))

    def _scale(self, t: int, ly: LayerInfo, w: Tensor) -> None:
        s = ly.binarizer.scale(w)
        if s is not None:
            self._scales.append((t, ly.index, torch.stack([s.mean(), s.min(), s.max()])))

    # ------------------------------------------------------------------ at flush
    def evaluate(self) -> pd.DataFrame:
        """Read the recorded statistics (one synchronisation), add warnings; returns the new ``scales`` rows."""
        for t, x in self._changed:
            for li, n in enumerate(x.cpu().tolist()):
                if n > 0:
                    self.warn("changed_outside_step", self.layers[li].name, t,
                              f"{int(n)} weights changed between the measurement after step {t} and the next "
                              "optimizer.step() (a clamp or in-place edit outside the step): the logged latent "
                              "weights are those before that change")
        self._changed.clear()
        for t, x in self._stats:
            for li, (max_g, max_m, bad, non_pm1, zeros) in enumerate(x.cpu().tolist()):
                ly = self.layers[li]
                tau = float(ly.group.get(ly.extra.get("threshold_key", "threshold"), math.nan)) \
                    if ly.family in BOP_FAMILIES else math.nan
                if not math.isnan(max_g) or not math.isnan(max_m):
                    self._dead[li][1] += 1
                    if max_g == 0 or (tau > 0 and max_m <= _DEAD_M_REL * tau):
                        self._dead[li][0] += 1
                if bad > 0:
                    self.warn("nonfinite_state", ly.name, t,
                              f"{int(bad)} NaN/Inf values in the {type(ly.optimizer).__name__} state at step {t}")
                if non_pm1 > 0:
                    self.warn("non_binary_weights", ly.name, t,
                              f"{int(non_pm1)} of {ly.n} weights are not ±1 under {type(ly.optimizer).__name__} at "
                              f"step {t}: w·m > τ then compares |w|·|m| with τ")
                if zeros > 0:
                    self.warn("binarizer_zeros", ly.name, t,
                              f"the binarizer maps {int(zeros)} weights to 0 at step {t} (counted as −1 by flips)")
        last = self._stats[-1][0] if self._stats else 0
        self._stats.clear()
        for li, (dead, n) in enumerate(self._dead):
            if n >= _DEAD_MIN_CHECKS and dead >= _DEAD_FRACTION * n:
                self.warn("dead_gradients", self.layers[li].name, last,
                          f"gradient exactly 0 (or max|m| ≤ {_DEAD_M_REL:g}·τ) at {dead} of {n} check steps: "
                          "no weight of this layer can flip (a dead straight-through estimator?)")
        rows = [{"step": t, "layer": self.layers[li].name, "scale_mean": v[0], "scale_min": v[1], "scale_max": v[2],
                 "binarizer": self.layers[li].binarizer.describe()}
                for t, li, v in ((t, li, x.cpu().tolist()) for t, li, x in self._scales)]
        self._scales.clear()
        return pd.DataFrame(rows)


def _kernels(*ts: Tensor | None):
    """The compiled pass's functions for tensors that are all on the CPU, contiguous and of the first one's float
    dtype (None entries skipped), else None."""
    ks = cpu_pass.load()
    t0 = ts[0]
    if ks is None or t0 is None or t0.device.type != "cpu" or t0.dtype not in (torch.float32, torch.float64):
        return None
    for t in ts:
        if t is not None and (t.device.type != "cpu" or t.dtype != t0.dtype or not t.is_contiguous()
                              or t.numel() != t0.numel()):
            return None
    return ks[np.dtype(np.float32 if t0.dtype == torch.float32 else np.float64)]


def _count_changed(w: Tensor, ref: Tensor) -> int | None:
    """#(w ≠ its copy ``ref``) by the compiled pass; None where it does not apply (the torch comparison then)."""
    k = _kernels(w, ref)
    return None if k is None else int(k.count_ne(w.data_ptr(), ref.data_ptr(), w.numel()))


def _compiled_row(ly: LayerInfo, w: Tensor, g: Tensor | None, st: dict) -> Tensor | None:
    """The layer's check row (max|g|, max|m|, non-finite state entries, |w| ≠ 1, zeros) from one compiled pass
    (``bnnp_check``): for a Bop-family layer with the sign binarizer whose only floating-point state is m; None
    otherwise."""
    if ly.family not in BOP_FAMILIES or type(ly.binarizer) is not Sign:
        return None
    m = st.get(ly.extra.get("momentum_key", "exp_avg"))
    floats = [v for v in st.values() if isinstance(v, Tensor) and v.is_floating_point()]
    if not isinstance(m, Tensor) or len(floats) != 1 or floats[0] is not m:
        return None
    g = g.detach() if g is not None and g.numel() else None
    k = _kernels(w, m.detach(), g)
    if k is None:
        return None
    out = np.full(5, math.nan)
    k.check(w.data_ptr(), m.data_ptr(), None if g is None else g.data_ptr(), w.numel(), out.ctypes.data)
    if not ly.binarizer.keeps_zero:
        out[4] = math.nan
    return torch.from_numpy(out)
