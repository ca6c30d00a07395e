"""Per-layer Bop threshold policies (does one global τ serve wide and thin layers? Helwegen et al. 2019 use one).

Bop flips a binary weight w when ``w · m > τ`` (Helwegen et al. 2019); Bop2ndOrder when ``w · m/(√v + ε) > τ``.
Every hyperparameter of :class:`bnn_probe.optim.Bop` is per parameter group, so a per-layer τ is one parameter
group per binary layer. A *policy* turns the named binary parameters of a model into such groups:

==================  ===========================================================================================
policy              τ_l for binary layer l (fan-in n_l = ``torch.nn.init._calculate_fan_in_and_fan_out(W_l)[0]``)
==================  ===========================================================================================
``global``          τ_l = τ                                                (the paper's baseline)
``fan-in``          τ_l = τ · (n_ref / n_l)^a                              (a = ``exponent``, default 0.5)
``calibrated``      τ_l starts at τ₀ and is driven online so that layer l's flip ratio stays at r*
``from-report``     τ_l = ``recommended_threshold`` of layer l in a report's ``tables/thresholds.csv``
``normalized``      τ_l = k · s_l, s_l an online, bias-corrected EMA over steps of layer l's mean |m| (scale-free)
``one-layer``       τ_l = f · τ for one named layer, τ for every other (the one-layer τ sweep)
==================  ===========================================================================================

``global`` is a Python keyword, so the callable is :func:`global_threshold`; ``getattr(thresholds, "global")``
and ``POLICIES["global"]`` name the same function.

Each group also carries ``"layer"`` (the parameter's name, e.g. ``"fc2.weight"``, as the probe and the run log name
layers) and ``"fan_in"``, so the log can say which τ belongs to which layer. :meth:`ThresholdPolicy.describe`
gives a JSON-able record (policy name, arguments and τ_l per layer) for the run's ``config``.

The calibrated controller (:class:`FlipRatioController`) updates ``group["threshold"]`` in place after the
optimizer step; the probe reads the threshold in force from the group at every step, so the τ trajectory per layer
lands in the steps table's ``threshold`` column without further work. The controller also keeps it in
``controller.history``.

Example:
    >>> import torch
    >>> from bnn_probe.models import BinaryMLP
    >>> from bnn_probe.nn import named_binary_parameters
    >>> from bnn_probe.optim import thresholds
    >>> model = BinaryMLP(64, [256, 16], 10)
    >>> policy = thresholds.fan_in(1e-6, reference_fan_in=64)
    >>> groups = policy.param_groups(named_binary_parameters(model))
    >>> [(g["layer"], g["fan_in"], round(g["threshold"], 9)) for g in groups]
    [('fc1.weight', 64, 1e-06), ('fc2.weight', 256, 5e-07), ('fc3.weight', 16, 2e-06)]
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import BnnProbeError

__all__ = [
    "POLICY_NAMES",
    "POLICIES",
    "ThresholdPolicy",
    "FlipRatioController",
    "global_threshold",
    "global_",
    "fan_in",
    "calibrated",
    "from_report",
    "normalized",
    "one_layer",
    "MomentumScaleThreshold",
    "make_policy",
    "policy_for_model",
    "layer_name",
    "layer_fan_in",
    "read_thresholds_csv",
    "controllers_of",
]

POLICY_NAMES: tuple[str, ...] = ("global", "fan-in", "calibrated", "from-report", "normalized", "one-layer")
THRESHOLDS_CSV_COLUMNS: tuple[str, ...] = ("layer", "recommended_threshold")


def layer_name(param_name: str) -> str:
    """The layer name of a parameter: its name without a trailing ``.weight`` (``"fc2.weight"`` → ``"fc2"``).

    >>> layer_name("classifier.fc1.weight"), layer_name("w")
    ('classifier.fc1', 'w')
    """
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


def layer_fan_in(param: Tensor) -> int:
    """Fan-in of a weight as PyTorch's initialisers define it: ``size(1) · prod(kernel)`` (a 1-D tensor: its size).

    >>> layer_fan_in(torch.empty(8, 3, 5)), layer_fan_in(torch.empty(10, 64)), layer_fan_in(torch.empty(7))
    (15, 64, 7)
    """
    if param.dim() < 2:
        return int(param.numel())
    return int(nn.init._calculate_fan_in_and_fan_out(param)[0])


def _check_positive(name: str, value: float, allow_zero: bool = True) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise BnnProbeError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} finite number, "
                            f"got {value!r}")
    return value


@dataclass
class ThresholdPolicy:
    """A per-layer threshold rule. Build one with :func:`global_threshold`, :func:`fan_in`, :func:`calibrated`
    or :func:`from_report` rather than directly.

    Attributes:
        name: one of :data:`POLICY_NAMES`.
        args: the policy's arguments (recorded in the log).
        rule: ``rule(layer, fan_in) -> τ_l``, the initial (for ``calibrated``: starting) threshold of a layer.
        controller_options: for ``calibrated`` / ``normalized``, the options of the online controller
            (:class:`FlipRatioController` / :class:`MomentumScaleThreshold`); else ``None``.
        controller: the online controller's class (``None``: :class:`FlipRatioController`).
    """

    name: str
    args: dict[str, Any]
    rule: Any
    controller_options: dict[str, Any] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    controller: Any = None

    def threshold_for(self, layer: str, fan_in: int) -> float:
        """τ_l of one layer (its starting value for ``calibrated``)."""
        return float(self.rule(layer, int(fan_in)))

    def param_groups(self, named_params: Iterable[tuple[str, Tensor]], **group_options: Any) -> list[dict[str, Any]]:
        """One parameter group per binary parameter: ``{"params": [p], "threshold": τ_l, "layer": ..., "fan_in": ...,
        **group_options}`` (``group_options`` such as ``gamma=1e-3`` are copied into every group).

        The τ_l used are also stored in :attr:`thresholds` (layer → τ) for :meth:`describe`.
        """
        if "threshold" in group_options:
            raise BnnProbeError("threshold is set by the threshold policy; do not pass it as a group option")
        groups: list[dict[str, Any]] = []
        self.thresholds = {}
        for name, p in named_params:
            layer, n = name, layer_fan_in(p)
            tau = self.threshold_for(layer, n)
            self.thresholds[layer] = tau
            groups.append({"params": [p], "threshold": tau, "layer": layer, "fan_in": n, **group_options})
        if not groups:
            raise BnnProbeError("the model has no binary parameters to give thresholds to")
        return groups

    def describe(self) -> dict[str, Any]:
        """JSON-able record for the run's ``config``: ``{"name", "args", "thresholds": {layer: τ_l}}`` (after
        :meth:`param_groups`; for ``calibrated`` the thresholds are the starting values)."""
        out: dict[str, Any] = {"name": self.name, "args": dict(self.args), "thresholds": dict(self.thresholds)}
        if self.controller_options is not None:
            out["controller"] = dict(self.controller_options)
        return out

    def attach(self, optimizer: torch.optim.Optimizer) -> FlipRatioController | MomentumScaleThreshold | None:
        """For ``calibrated`` (``normalized``): hook a :class:`FlipRatioController` (:class:`MomentumScaleThreshold`)
        on ``optimizer`` and return it; else ``None``."""
        if self.controller_options is None:
            return None
        return (self.controller or FlipRatioController)(optimizer, **self.controller_options)


def global_threshold(threshold: float) -> ThresholdPolicy:
    """The paper's baseline: every layer gets τ_l = ``threshold``.

    >>> global_threshold(1e-6).threshold_for("fc1", 4096)
    1e-06
    """
    tau = _check_positive("threshold", threshold)
    return ThresholdPolicy("global", {"threshold": tau}, lambda layer, n: tau)


global_ = global_threshold
globals()["global"] = global_threshold  # ``getattr(thresholds, "global")``: the CLI's name for the policy


def fan_in(threshold: float, reference_fan_in: int, exponent: float = 0.5) -> ThresholdPolicy:
    """τ_l = τ · (n_ref / n_l)^a: a layer with fan-in n_ref gets τ, wider layers less (for a > 0).

    a = 0.5 is the batch-norm argument (|m| ∝ n^−1/2, docs/thresholds.md); measure it with the ``thresholds`` study.
    Meant for Bop; Bop2ndOrder normalises m by √v already, so there ``global`` is the natural choice.

    >>> p = fan_in(1e-6, reference_fan_in=64, exponent=0.5)
    >>> round(p.threshold_for("fc2", 2048), 12)   # 1e-6 · (64/2048)^0.5 = 1e-6 / √32
    1.76777e-07
    """
    tau = _check_positive("threshold", threshold)
    n_ref = int(reference_fan_in)
    if n_ref <= 0:
        raise BnnProbeError(f"reference_fan_in must be a positive integer, got {reference_fan_in!r}")
    a = float(exponent)
    if not math.isfinite(a):
        raise BnnProbeError(f"exponent must be finite, got {exponent!r}")
    return ThresholdPolicy("fan-in", {"threshold": tau, "reference_fan_in": n_ref, "exponent": a},
                           lambda layer, n: tau * (n_ref / n) ** a)


def calibrated(target_flip_ratio: float, initial_threshold: float = 1e-6, every: int = 10, gain: float = 0.5,
               max_step: float = math.log(2.0), min_step: float = 0.01, deadband: float = 0.1,
               min_threshold: float = 1e-12, max_threshold: float = 1e3, min_flips: float = 50.0) -> ThresholdPolicy:
    """An online controller holding each layer's flip ratio at ``target_flip_ratio`` (see
    :class:`FlipRatioController` for the update rule and its arguments). Every layer starts at ``initial_threshold``.

    >>> p = calibrated(1e-3, initial_threshold=1e-7)
    >>> p.threshold_for("fc1", 64), p.controller_options["target_flip_ratio"]
    (1e-07, 0.001)
    """
    r = _check_positive("target_flip_ratio", target_flip_ratio, allow_zero=False)
    if r >= 1:
        raise BnnProbeError(f"target_flip_ratio must be below 1, got {r}")
    tau0 = _check_positive("initial_threshold", initial_threshold, allow_zero=False)
    opts = {"target_flip_ratio": r, "every": int(every), "gain": float(gain), "max_step": float(max_step),
            "min_step": float(min_step), "deadband": float(deadband), "min_threshold": float(min_threshold),
            "max_threshold": float(max_threshold), "min_flips": float(min_flips)}
    return ThresholdPolicy("calibrated", {"target_flip_ratio": r, "initial_threshold": tau0}, lambda layer, n: tau0,
                           controller_options=opts)


def one_layer(threshold: float, layer: str, factor: float) -> ThresholdPolicy:
    """τ_l = ``factor`` · τ for the layer named ``layer`` (``fc2`` or ``fc2.weight``), τ for every other layer: one
    point of the one-layer τ sweep (``bnn-probe study thresholds``). A model without that layer raises
    :class:`bnn_probe.errors.BnnProbeError` when the groups are built.

    >>> p = one_layer(1e-6, "fc2", 4.0)
    >>> p.threshold_for("fc2.weight", 2048), p.threshold_for("fc1.weight", 64)
    (4e-06, 1e-06)
    """
    tau = _check_positive("threshold", threshold)
    f = _check_positive("factor", factor, allow_zero=False)
    target = layer_name(str(layer))
    if not target:
        raise BnnProbeError("the one-layer policy needs the name of the layer whose τ to scale (--threshold-layer)")

    def rule(name: str, n: int) -> float:
        return tau * f if layer_name(name) == target else tau

    pol = ThresholdPolicy("one-layer", {"threshold": tau, "layer": target, "factor": f}, rule)
    build = pol.param_groups

    def param_groups(named_params: Iterable[tuple[str, Tensor]], **group_options: Any) -> list[dict[str, Any]]:
        groups = build(named_params, **group_options)
        names = [layer_name(g["layer"]) for g in groups]
        if target not in names:
            raise BnnProbeError(f"no binary layer {target!r} to scale the threshold of (the model has "
                                f"{', '.join(names)})")
        return groups

    pol.param_groups = param_groups  # type: ignore[method-assign]
    return pol


NORMALIZED_SCALES: tuple[str, ...] = ("mean_abs", "rms", "flow")
OVERSHOOT_RHO = 0.5826  # −ζ(1/2)/√(2π): mean overshoot of a Gaussian random walk over a level, in units of its step
DEFAULT_MULTIPLE = 2.0


def normalized(multiple: float = DEFAULT_MULTIPLE, initial_threshold: float = 1e-8, beta: float = 0.1,
               every: int = 10, scale: str = "mean_abs", momentum_key: str = "exp_avg",
               balance: float = 0.0) -> ThresholdPolicy:
    """A scale-free τ: τ_l = k · s_l, with s_l an online estimate of layer l's typical |m| (see
    :class:`MomentumScaleThreshold`). ``multiple`` is k: a weight flips when w·m exceeds k times its layer's mean
    |m| (Bop2ndOrder: of |m̂|). Every layer starts at ``initial_threshold`` (used while m = 0, i.e. at the first
    step). ``momentum_key``: the optimizer-state key holding m (a third-party Bop-like optimizer's, as given to
    ``bnn_probe.attach(..., momentum_key=...)``; Bop and Bop2ndOrder: ``"exp_avg"``). ``balance`` > 0 adds the
    allocation feedback of :class:`MomentumScaleThreshold` (τ_l = k·c_l·s_l, c_l steered by the layers' counted
    flips towards equal flip ratios, geometric mean of c_l held at 1); 0 (the default) is the pure scale rule.

    >>> p = normalized(2.0)
    >>> p.threshold_for("fc1", 64), p.controller_options["multiple"], p.controller_options["scale"]
    (1e-08, 2.0, 'mean_abs')
    """
    k = _check_positive("multiple", multiple, allow_zero=False)
    tau0 = _check_positive("initial_threshold", initial_threshold)
    beta = float(beta)
    if not 0 < beta <= 1:
        raise BnnProbeError(f"beta must be in (0, 1], got {beta}")
    if int(every) < 1:
        raise BnnProbeError(f"every must be a positive integer, got {every}")
    if scale not in NORMALIZED_SCALES:
        raise BnnProbeError(f"scale must be one of {', '.join(NORMALIZED_SCALES)}, got {scale!r}")
    if not (isinstance(momentum_key, str) and momentum_key):
        raise BnnProbeError(f"momentum_key must be a non-empty string, got {momentum_key!r}")
    balance = float(balance)
    if not (math.isfinite(balance) and balance >= 0):
        raise BnnProbeError(f"balance must be a finite number >= 0, got {balance}")
    opts = {"multiple": k, "beta": beta, "every": int(every), "scale": scale}
    args = {"multiple": k, "initial_threshold": tau0, "beta": beta, "every": int(every), "scale": scale}
    if balance > 0:
        opts["balance"] = args["balance"] = balance
    if momentum_key != "exp_avg":
        opts["momentum_key"] = args["momentum_key"] = momentum_key
    return ThresholdPolicy("normalized", args, lambda layer, n: tau0,
                           controller_options=opts, controller=MomentumScaleThreshold)


def read_thresholds_csv(path: str | Path, run: str | None = None) -> dict[str, float]:
    """Read a report's ``tables/thresholds.csv`` (or the report directory holding it) into {layer: τ}.

    Needs the columns ``layer`` and ``recommended_threshold``. When the file has a ``run`` column naming several
    runs, ``run`` picks one (without it: an error listing them). Every τ must be a finite number ≥ 0 and every layer
    appear once. Anything else raises :class:`bnn_probe.errors.BnnProbeError` with a one-line message.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "tables" / "thresholds.csv" if (p / "tables" / "thresholds.csv").exists() else p / "thresholds.csv"
    if not p.is_file():
        raise BnnProbeError(f"thresholds file not found: {p} (give a report's tables/thresholds.csv)")
    try:
        with p.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BnnProbeError(f"cannot read thresholds file {p}: {e}") from None
    missing = [c for c in THRESHOLDS_CSV_COLUMNS if c not in header]
    if not rows or missing:
        what = "no rows" if not rows else f"missing column(s) {', '.join(missing)}"
        raise BnnProbeError(f"malformed thresholds file {p}: {what} (need columns layer, recommended_threshold)")
    lines = list(enumerate(rows, start=2))
    if "run" in header:
        runs = list(dict.fromkeys((r["run"] or "").strip() for r in rows))
        if run is not None:
            if run not in runs:
                raise BnnProbeError(f"{p} has no run {run!r} (it has {', '.join(runs)})")
            lines = [(i, r) for i, r in lines if (r["run"] or "").strip() == run]
        elif len(runs) > 1:
            raise BnnProbeError(f"{p} holds {len(runs)} runs ({', '.join(runs)}): choose one")
    out: dict[str, float] = {}
    for i, row in lines:
        layer = (row["layer"] or "").strip()
        raw = (row["recommended_threshold"] or "").strip()
        try:
            tau = float(raw)
        except ValueError:
            tau = float("nan")
        if not layer or not math.isfinite(tau) or tau < 0:
            why = f" ({row['bound'].strip()})" if (row.get("bound") or "").strip() else ""
            raise BnnProbeError(f"malformed thresholds file {p}, line {i}: need a layer name and a finite "
                                f"recommended_threshold >= 0, got {row['layer']!r}, {raw!r}{why}")
        if layer in out:
            raise BnnProbeError(f"malformed thresholds file {p}: layer {layer!r} appears more than once")
        out[layer] = tau
    return out


def from_report(path: str | Path, run: str | None = None) -> ThresholdPolicy:
    """τ_l = the ``recommended_threshold`` of layer l in a report's ``tables/thresholds.csv``.

    Layers are matched by name (``fc2`` or ``fc2.weight``); ``run`` picks one run when the table holds several.
    A model layer missing from the file raises :class:`bnn_probe.errors.BnnProbeError` when the groups are built.
    """
    table = read_thresholds_csv(path, run)
    normalized = {layer_name(k): v for k, v in table.items()}

    def rule(layer: str, n: int) -> float:
        layer = layer_name(layer)
        if layer not in normalized:
            raise BnnProbeError(f"{path}: no recommended threshold for layer {layer!r} "
                                f"(the file has {', '.join(sorted(normalized))})")
        return normalized[layer]

    args: dict[str, Any] = {"path": str(path)}
    if run is not None:
        args["run"] = run
    return ThresholdPolicy("from-report", args, rule)


POLICIES: dict[str, Any] = {"global": global_threshold, "fan-in": fan_in, "calibrated": calibrated,
                            "from-report": from_report, "normalized": normalized, "one-layer": one_layer}


def make_policy(name: str, *, threshold: float = 1e-6, reference_fan_in: int | None = None,
                fan_in_exponent: float = 0.5, target_flip_ratio: float | None = None,
                thresholds_csv: str | Path | None = None, fan_ins: Iterable[int] | None = None,
                report_run: str | None = None, threshold_multiple: float | None = None,
                threshold_layer: str | None = None, threshold_layer_factor: float = 1.0,
                threshold_scale: str = "mean_abs", threshold_balance: float = 0.0,
                threshold_every: int | None = None, **calibrated_options: Any) -> ThresholdPolicy:
    """Build a policy from command-line style options (``bnn-probe train --threshold-policy ...``).

    ``fan-in`` without ``reference_fan_in`` takes the geometric mean of ``fan_ins`` (the model's fan-ins), so the
    policy keeps the geometric-mean τ equal to ``threshold``. ``normalized`` takes ``threshold_multiple`` as k
    (default :data:`DEFAULT_MULTIPLE`), ``threshold`` as the τ of the first step, ``threshold_scale`` as its
    scale (``"mean_abs"``, ``"rms"`` or ``"flow"``) and ``threshold_balance`` as its allocation feedback gain.
    ``threshold_every`` (``calibrated`` and ``normalized``): steps between the controller's host updates (10).

    >>> make_policy("fan-in", threshold=1e-6, fan_ins=[64, 1024]).args["reference_fan_in"]
    256
    """
    if name == "global":
        return global_threshold(threshold)
    if name == "fan-in":
        if reference_fan_in is None:
            ns = [int(n) for n in (fan_ins or [])]
            if not ns:
                raise BnnProbeError("fan-in policy needs reference_fan_in (or the model's fan-ins)")
            reference_fan_in = round(math.exp(sum(math.log(n) for n in ns) / len(ns)))
        return fan_in(threshold, reference_fan_in, fan_in_exponent)
    every = {} if threshold_every is None else {"every": threshold_every}  # else the controller's default
    if name == "calibrated":
        if target_flip_ratio is None:
            raise BnnProbeError("--threshold-policy calibrated needs --target-flip-ratio")
        calibrated_options.update(every)
        return calibrated(target_flip_ratio, initial_threshold=threshold if threshold > 0 else 1e-6,
                          **calibrated_options)
    if name == "from-report":
        if thresholds_csv is None:
            raise BnnProbeError("--threshold-policy from-report needs --thresholds-csv PATH")
        return from_report(thresholds_csv, report_run)
    if name == "normalized":
        k = DEFAULT_MULTIPLE if threshold_multiple is None else threshold_multiple
        return normalized(k, initial_threshold=threshold, scale=threshold_scale, balance=threshold_balance, **every)
    if name == "one-layer":
        return one_layer(threshold, threshold_layer or "", threshold_layer_factor)
    raise BnnProbeError(f"unknown threshold policy {name!r}: choose one of {', '.join(POLICY_NAMES)}")


def policy_for_model(model: nn.Module, name: str, *, threshold: float = 1e-6, fan_in_exponent: float = 0.5,
                     target_flip_ratio: float | None = None, thresholds_csv: str | Path | None = None,
                     threshold_multiple: float | None = None, threshold_layer: str | None = None,
                     threshold_layer_factor: float = 1.0, threshold_scale: str = "mean_abs",
                     threshold_balance: float = 0.0, threshold_every: int | None = None) -> ThresholdPolicy:
    """:func:`make_policy` for a model, from ``bnn-probe train`` options: ``fan-in`` takes the geometric mean of the
    model's binary fan-ins as n_ref; ``--thresholds-csv PATH#RUN`` picks run RUN of a multi-run report table.

    >>> from bnn_probe.models import BinaryMLP
    >>> policy_for_model(BinaryMLP(64, [1024], 16), "fan-in", threshold=1e-6).args["reference_fan_in"]
    256
    """
    from ..nn import binary_parameters

    run = None
    if thresholds_csv is not None and "#" in str(thresholds_csv):
        thresholds_csv, run = str(thresholds_csv).rsplit("#", 1)
    return make_policy(name, threshold=threshold, fan_in_exponent=fan_in_exponent,
                       target_flip_ratio=target_flip_ratio, thresholds_csv=thresholds_csv, report_run=run,
                       threshold_multiple=threshold_multiple, threshold_layer=threshold_layer,
                       threshold_layer_factor=threshold_layer_factor, threshold_scale=threshold_scale,
                       threshold_balance=threshold_balance, threshold_every=threshold_every,
                       fan_ins=[layer_fan_in(p) for p in binary_parameters(model)])


def _threshold_groups(optimizer: Any) -> list[dict[str, Any]]:
    """The param groups carrying a ``threshold`` (looks inside wrappers with ``.optimizers``)."""
    opts = list(getattr(optimizer, "optimizers", None) or [optimizer])
    return [g for o in opts for g in o.param_groups if "threshold" in g]


def _hookable(optimizer: Any) -> list[torch.optim.Optimizer]:
    opts = list(getattr(optimizer, "optimizers", None) or [optimizer])
    return [o for o in opts if any("threshold" in g for g in o.param_groups)]


_CONTROLLERS_ATTR = "_bnn_probe_threshold_controllers"


def controllers_of(optimizer: Any) -> list[Any]:
    """The online threshold controllers attached to ``optimizer`` (in attachment order), for checkpoints: a resumed
    run restores each one's :meth:`state_dict` (:mod:`bnn_probe.resume`)."""
    return list(getattr(optimizer, _CONTROLLERS_ATTR, []))


class _HookedController:
    """Shared by the online controllers: the optimizer hooks they registered, and their removal."""

    _handles: list[Any]

    def _register(self, optimizer: Any) -> None:
        """Make this controller findable from its optimizer (:func:`controllers_of`)."""
        reg = getattr(optimizer, _CONTROLLERS_ATTR, None)
        if reg is None:
            reg = []
            setattr(optimizer, _CONTROLLERS_ATTR, reg)
        reg.append(self)
        self._registered_on = optimizer

    def remove(self) -> None:
        """Remove the hooks (thresholds keep their last values)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        reg = getattr(getattr(self, "_registered_on", None), _CONTROLLERS_ATTR, [])
        if self in reg:
            reg.remove(self)


class _FlipCounter:
    """Flips per thresholded layer, accumulated on the device without a host synchronisation: :meth:`mark` stores
    the signs s = (w ≥ 0) before a step, :meth:`count` adds Σ[(w ≥ 0) ≠ s] of each layer to :attr:`flips`."""

    def __init__(self, n_layers: int, device: torch.device) -> None:
        self.flips = torch.zeros(n_layers, dtype=torch.float64, device=device)
        self._signs: list[list[Tensor]] | None = None

    @torch.no_grad()
    def mark(self, groups: list[dict[str, Any]]) -> None:
        self._signs = [[p.detach() >= 0 for p in g["params"]] for g in groups]

    @torch.no_grad()
    def count(self, groups: list[dict[str, Any]]) -> bool:
        """Add the flips since :meth:`mark`; False (nothing counted) without a mark."""
        if self._signs is None:
            return False
        counts = [sum(((p.detach() >= 0) != o).sum() for p, o in zip(g["params"], old, strict=True))
                  for g, old in zip(groups, self._signs, strict=True)]
        self.flips += torch.stack([torch.as_tensor(c, device=self.flips.device) for c in counts]).to(self.flips)
        self._signs = None
        return True


class FlipRatioController(_HookedController):
    """Hold each layer's flip ratio at a target by adjusting its τ multiplicatively (log-space, Rprop-style steps).

    Measurement (on the device, one host copy every ``every`` steps): a pre-step hook stores the signs
    ``s = (w ≥ 0)`` of every controlled weight; a post-step hook adds ``Σ[s_new ≠ s]`` to a per-layer device buffer.
    Layer l's window lasts k_l steps, a multiple of ``every`` long enough to expect ``min_flips`` flips at the
    target (k_l ≥ min_flips / (r* · n_l)), so small layers are not steered by a handful of flips. Its flip ratio is

        r̂_l = flips_l / (k_l · n_l)              (n_l weights; the same per-step ratio the probe logs)

    Update (per layer, once per window; e_l = log(r̂_l / r*) with r̂_l floored at half a flip per window):

        if |e_l| ≤ deadband:            no change
        else:  Δ_l = sign(e_l) · min(gain · |e_l|, s_l)
               log τ_l ← clamp(log τ_l + Δ_l, log min_threshold, log max_threshold)
               s_l ← min(1.2 · s_l, max_step)   if e_l has the sign of the previous update's error
               s_l ← max(0.5 · s_l, min_step)   if it changed sign (the target was crossed)

    Why this law: the flip ratio of a Bop layer falls steeply and with an unknown, layer- and time-dependent
    elasticity β = −d log r / d log τ (for Gaussian-like m it grows like (τ/σ_m)², from ≈1 to ≈10). A plain
    proportional step Δ = κ·e is monotone only while κβ < 1 and oscillates for κβ > 1, so no fixed gain suits
    every layer. Capping the step by a trust size s_l that halves whenever the error changes sign (Rprop, Riedmiller
    & Braun 1993) bounds each multiplicative change by exp(max_step) (×2 by default), and makes any oscillation
    decay geometrically: the controller brackets τ* and then narrows the bracket; the deadband (±10 % in r̂)
    stops it chasing the sampling noise of a window's flip count. Measuring over whole windows at a fixed τ
    (instead of an EMA across updates) keeps stale flip counts from an old τ out of the error signal.

    The controller writes ``group["threshold"]`` in place, at the start of the step after the window closes (in the
    pre-step hook), so whatever reads the group after a step — the probe's post-step hook, in whichever order the
    hooks run — sees the τ that step used; the steps table's ``threshold`` column is then the τ trajectory per layer.
    :attr:`history` holds ``(step, {layer: τ})`` for every update (τ in force from step + 1 on) plus the start.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(100))
        >>> opt = torch.optim.SGD([{"params": [w], "threshold": 1.0, "layer": "w"}], lr=0.0)
        >>> ctl = FlipRatioController(opt, target_flip_ratio=0.01, every=1, min_flips=1)
        >>> opt.step()        # no flip: r̂ = ½ flip / 100 = 0.005 < r*: log τ -= 0.5 · log 2 from the next step on
        >>> round(ctl.history[-1][1]["w"], 4), opt.param_groups[0]["threshold"]
        (0.7071, 1.0)
        >>> opt.step(); round(opt.param_groups[0]["threshold"], 4)
        0.7071
    """

    def __init__(self, optimizer: Any, target_flip_ratio: float, every: int = 10, gain: float = 0.5,
                 max_step: float = math.log(2.0), min_step: float = 0.01, deadband: float = 0.1,
                 min_threshold: float = 1e-12, max_threshold: float = 1e3, min_flips: float = 50.0) -> None:
        if not 0 < target_flip_ratio < 1:
            raise BnnProbeError(f"target_flip_ratio must be in (0, 1), got {target_flip_ratio}")
        if every < 1 or gain <= 0 or not 0 < min_step <= max_step or deadband < 0 or not 0 < min_threshold:
            raise BnnProbeError("controller needs every >= 1, gain > 0, 0 < min_step <= max_step, deadband >= 0, "
                                "min_threshold > 0")
        self.target = float(target_flip_ratio)
        self.every, self.gain, self.max_step, self.min_step = int(every), float(gain), float(max_step), float(min_step)
        self.deadband = float(deadband)
        self.log_min, self.log_max = math.log(min_threshold), math.log(max_threshold)
        self.optimizer = optimizer
        groups = _threshold_groups(optimizer)
        if not groups:
            raise BnnProbeError("the optimizer has no parameter group with a 'threshold' to calibrate")
        self._n_groups = len(groups)
        self.layers = [str(g.get("layer", f"group{i}")) for i, g in enumerate(groups)]
        self.n_weights = [sum(p.numel() for p in g["params"]) for g in self.groups]
        for g in self.groups:
            if g["threshold"] <= 0:
                g["threshold"] = math.exp(self.log_min)
        device = self.groups[0]["params"][0].device
        self._counter = _FlipCounter(len(self.groups), device)
        # a layer's window: at least `every` steps and enough steps to expect `min_flips` flips at the target
        self.min_flips = float(min_flips)
        self._window_len = [max(self.every, self.every * math.ceil(self.min_flips / (self.target * n * self.every)))
                            for n in self.n_weights]
        self._window = [0] * len(self.groups)
        self._pending: dict[int, float] = {}
        self.step_count = 0
        self._trust = [self.max_step] * len(self.groups)
        self._last_err_sign = [0] * len(self.groups)
        self.history: list[tuple[int, dict[str, float]]] = [(0, self.thresholds())]
        self._handles = []
        for opt in _hookable(optimizer):
            self._handles.append(opt.register_step_pre_hook(self._pre))
            self._handles.append(opt.register_step_post_hook(self._post))
        # a wrapper (CaseOptimizer) steps each inner optimizer once: hook each exactly once
        self._n_hooked = len(self._handles) // 2
        self._register(optimizer)
        self._posts_seen = 0

    @property
    def groups(self) -> list[dict[str, Any]]:
        """The optimizer's param groups with a threshold, looked up afresh (``load_state_dict`` replaces them)."""
        groups = _threshold_groups(self.optimizer)
        if len(groups) != self._n_groups:
            raise BnnProbeError(f"the optimizer now has {len(groups)} thresholded param groups, the controller was "
                                f"built for {self._n_groups}")
        return groups

    def thresholds(self) -> dict[str, float]:
        """τ per layer currently in the optimizer's groups (an update decided at a step applies from the next)."""
        return {layer: float(g["threshold"]) for layer, g in zip(self.layers, self.groups, strict=True)}

    @torch.no_grad()
    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._posts_seen == 0:
            if self._pending:  # apply the last window's update now: the τ in a group is the τ its step used
                groups = self.groups
                for i, tau in self._pending.items():
                    groups[i]["threshold"] = tau
                self._pending = {}
            self._counter.mark(self.groups)

    @torch.no_grad()
    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._posts_seen += 1
        if self._posts_seen < self._n_hooked:
            return
        self._posts_seen = 0
        self._counter.count(self.groups)
        self.step_count += 1
        for i in range(len(self._window)):
            self._window[i] += 1
        if self.step_count % self.every == 0:
            self._update()

    def _update(self) -> None:
        flips = self._counter.flips.tolist()  # the one host copy per `every` steps
        changed = False
        for i, g in enumerate(self.groups):
            k = self._window[i]
            if k < self._window_len[i]:
                continue
            self._counter.flips[i] = 0.0
            self._window[i] = 0
            ratio = max(flips[i], 0.5) / (k * self.n_weights[i])
            err = math.log(ratio / self.target)
            if abs(err) <= self.deadband:
                continue
            sgn = 1 if err > 0 else -1
            delta = sgn * min(self.gain * abs(err), self._trust[i])
            log_tau = min(max(math.log(g["threshold"]) + delta, self.log_min), self.log_max)
            self._pending[i] = math.exp(log_tau)
            changed = True
            if self._last_err_sign[i] == -sgn:
                self._trust[i] = max(0.5 * self._trust[i], self.min_step)
            elif self._last_err_sign[i] == sgn:
                self._trust[i] = min(1.2 * self._trust[i], self.max_step)
            self._last_err_sign[i] = sgn
        if changed:
            now = self.thresholds()
            self.history.append((self.step_count, {**now, **{self.layers[i]: t for i, t in self._pending.items()}}))

    def state_dict(self) -> dict[str, Any]:
        """Controller state for resumed runs (the thresholds themselves live in the optimizer's groups)."""
        return {"trust": list(self._trust), "last_err_sign": list(self._last_err_sign), "step_count": self.step_count,
                "history": [(s, dict(t)) for s, t in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._trust = [float(x) for x in state["trust"]]
        self._last_err_sign = [int(x) for x in state["last_err_sign"]]
        self.step_count = int(state["step_count"])
        self.history = [(int(s), dict(t)) for s, t in state["history"]]


class MomentumScaleThreshold(_HookedController):
    """The ``normalized`` policy's online rule: τ_l = k · s_l, s_l a stable per-layer scale of Bop's momentum.

    At the start of step t (a pre-step hook), before Bop updates m, it measures layer l's scale of m_{t−1}
    (Bop2ndOrder: of m̂_{t−1}, the quantity its flip rule compares with τ), on the device:

        mean_abs:  a_l = Σ|m| / n_l            rms:  a_l = (Σ m² / n_l)^½             (n_l weights of layer l)

    and folds it into a bias-corrected exponential moving average over steps (Adam's correction, Kingma & Ba 2015):

        e_l ← (1 − β) e_l + β a_l,      c ← (1 − β) c + β   (c = 1 − (1 − β)^u after u updates),      s_l = e_l / c

    so the first measurement is used as it is and later ones are averaged over ≈ 1/β steps.

    ``scale="flow"`` also measures the step Bop is about to take, δ_l = (Σ(γ(g_t − m_{t−1}))² / n_l)^½ (same EMA),
    and sets τ_l = max(k·s_l − ρ·δ_l, 0), s_l the mean |m|, ρ = −ζ(1/2)/√(2π) ≈ 0.583. Why: a flip turns the margin
    w·m = τ + o into −(τ + o), and the next flip needs it back past τ, so the flip ratio is r_l = v_l/(2(τ_l + ō_l))
    (the flow model of docs/reports.md), v_l the pace of the margin and ō_l the mean overshoot, ≈ ρ·δ_l for a
    random walk of step δ_l (Siegmund 1979). With v_l ∝ s_l (measured: v_l/s_l = 0.0020–0.0026 in every layer of
    the MNIST-1D conv net at γ = 1e-4), equal flip ratios need (τ_l + ō_l)/s_l equal, i.e. τ_l = k·s_l − ō_l; plain
    τ_l = k·s_l ignores ō_l, which dominates when k is small (τ below one step of m). Here k is the distance
    between flips, τ + ō, in units of the layer's mean |m|. Bop's raw m only (not Bop2ndOrder's m̂).

    ``balance`` = κ > 0 adds allocation feedback from counted flips, for what a scale of m cannot see: layers whose
    margins move at different paces per unit of |m| (measured up to ≈ 2× apart on the MNIST-1D conv net). τ_l uses
    k·c_l in place of k, and at every host update (below) the flips Σ[(w ≥ 0) ≠ s] counted by a post-step hook
    since the last one update

        F_l ← λF_l + flips_l,  N_l ← λN_l + steps·n_l,  r_l = (F_l + ½)/N_l   (λ = 0.5 per update)
        e_l = log r_l − mean_j log r_j,   log c_l ← log c_l + sign(e_l)·min(κ|e_l|, u_l),   then centred

    (mean_l log c_l = 0), with u_l a trust size (Rprop, as in :class:`FlipRatioController`: halved when e_l changes
    sign, ×1.2 when it keeps it, within [0.01, log 2]) — the flip ratio's elasticity to τ reaches 5 at γ = 1e-3, so
    any fixed gain would oscillate somewhere. A layer flipping more than the layers' geometric mean gets a larger τ,
    and the geometric mean of the c_l stays 1: k still sets the level, the feedback only the allocation across layers
    (no target flip ratio, unlike :class:`FlipRatioController`). |log c_l| ≤ log 1000.

    Every ``every`` steps (and at the first measurement) the scales are copied to the host in one transfer and the
    groups get ``threshold = k · s_l``, which the step that follows uses: the τ in a group after a step is the τ
    that step used, so the probe's ``threshold`` column is the τ trajectory. Before the first step m = 0 and the
    groups keep the policy's starting τ; a layer whose m is all zero keeps its last τ.

    What k means: Bop flips w when w·m > τ, so k is the margin in units of the layer's typical |m|. A weight whose
    momentum points along it flips once it is k times as strong as the layer's average momentum; since the ratio
    w·m / s_l does not change when a layer's gradients are rescaled (by fan-in, batch norm or a learning-rate
    schedule of the layers around it), neither does the layer's flip rate. :attr:`history` holds ``(step, {layer:
    τ})`` for every host update (τ in force from step + 1 on) plus the start.

    Example (one layer, γ = 0.5, k = 1, β = 1 so s_l is the last measurement):
        >>> import torch
        >>> from bnn_probe.optim import Bop
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0, -1.0, -1.0]))
        >>> bop = Bop([{"params": [w], "threshold": 10.0, "layer": "w"}], gamma=0.5)
        >>> ctl = MomentumScaleThreshold(bop, multiple=1.0, beta=1.0, every=1)
        >>> w.grad = torch.tensor([4.0, 0.0, 0.0, -2.0]); bop.step()   # m = [2, 0, 0, -1]; τ = 10: no flip
        >>> w.grad = torch.tensor([0.0, 0.0, 0.0, 0.0]); bop.step()    # τ = mean|m| = 0.75; m = [1, 0, 0, -0.5]
        >>> bop.param_groups[0]["threshold"], w.tolist()              # w·m = [1, 0, 0, 0.5]: only w[0] flips
        (0.75, [-1.0, 1.0, -1.0, -1.0])
    """

    BALANCE_FORGET = 0.5  # λ: the flip counts of a window before weigh λ as much as the newest one's
    BALANCE_MAX_STEP = math.log(2.0)  # no update changes a c_l by more than ×2
    BALANCE_MIN_STEP = 0.01  # the trust size's floor
    BALANCE_FIRST_STEP = 0.05  # the trust size at the start (grows ×1.2 per update while the error keeps its sign)
    BALANCE_LIMIT = math.log(1e3)  # |log c_l| ≤ log 1000

    def __init__(self, optimizer: Any, multiple: float, beta: float = 0.1, every: int = 10,
                 scale: str = "mean_abs", momentum_key: str = "exp_avg", balance: float = 0.0) -> None:
        if not (math.isfinite(multiple) and multiple > 0) or not 0 < beta <= 1 or every < 1 \
                or scale not in NORMALIZED_SCALES or not (math.isfinite(balance) and balance >= 0):
            raise BnnProbeError(f"normalized thresholds need multiple > 0, 0 < beta <= 1, every >= 1, balance >= 0 "
                                f"and scale in {NORMALIZED_SCALES}; got {multiple}, {beta}, {every}, {balance}, "
                                f"{scale!r}")
        self.multiple, self.beta, self.every, self.scale = float(multiple), float(beta), int(every), scale
        self.balance = float(balance)
        self.momentum_key = str(momentum_key)
        self.optimizer = optimizer
        groups = _threshold_groups(optimizer)
        if not groups:
            raise BnnProbeError("the optimizer has no parameter group with a 'threshold' to normalise")
        if scale == "flow" and any(callable(getattr(o, "normalized_momentum", None)) for o in _hookable(optimizer)):
            raise BnnProbeError("normalized thresholds with scale='flow' need Bop's raw momentum (Bop or a Bop-like "
                                "optimizer), not Bop2ndOrder's m̂; use scale='mean_abs' there")
        self.layers = [str(g.get("layer", f"group{i}")) for i, g in enumerate(groups)]
        self.n_weights = [sum(p.numel() for p in g["params"]) for g in groups]
        # balance: log c_l, forgetting sums of flips F_l and weight-steps N_l, the signs at the last pre-step hook
        self.log_c = [0.0] * len(groups)
        self._flip_sum = [0.0] * len(groups)
        self._count_sum = [0.0] * len(groups)
        self._trust = [self.BALANCE_FIRST_STEP] * len(groups)
        self._last_sign = [0] * len(groups)
        self._counter = _FlipCounter(len(groups), groups[0]["params"][0].device)
        self._counted = 0
        self._ema: Tensor | None = None
        self._weight = 0.0  # c = 1 − (1 − β)^u, kept on the host (no device sync)
        self.n_updates = 0
        self.step_count = 0
        self.history: list[tuple[int, dict[str, float]]] = [(0, self.thresholds())]
        self._handles = [o.register_step_pre_hook(self._pre) for o in _hookable(optimizer)]
        if self.balance > 0:
            self._handles += [o.register_step_post_hook(self._post) for o in _hookable(optimizer)]
        self._register(optimizer)

    def thresholds(self) -> dict[str, float]:
        """τ per layer currently in the optimizer's groups."""
        return {layer: float(g["threshold"]) for layer, g in
                zip(self.layers, _threshold_groups(self.optimizer), strict=True)}

    def scales(self) -> dict[str, float]:
        """s_l per layer (bias-corrected EMA; nan before the first measurement). One host copy."""
        if self._ema is None or self._weight <= 0:
            return {layer: math.nan for layer in self.layers}
        return dict(zip(self.layers, (self._ema / self._weight).tolist()[:len(self.layers)], strict=True))

    def _momentum(self, opt: Any, p: Tensor) -> Tensor | None:
        """m of ``p`` (Bop2ndOrder: m̂ via its ``normalized_momentum``), None before the optimizer has state for it.
        State without ``momentum_key`` (a third-party optimizer keeping m elsewhere) is an error, not a silent τ."""
        state = opt.state.get(p, {})
        if self.momentum_key not in state:
            if state:
                raise BnnProbeError(f"normalized thresholds: the optimizer's state has no {self.momentum_key!r} "
                                    f"(keys: {', '.join(map(str, state))}); pass momentum_key= naming where m is")
            return None
        norm = getattr(opt, "normalized_momentum", None)
        return norm(p) if callable(norm) and self.momentum_key == "exp_avg" else state[self.momentum_key]

    @torch.no_grad()
    def _measure(self) -> Tensor | None:
        """a_l for every layer as one device tensor, or None before Bop has any state."""
        vals, seen = [], False
        opts = {id(g): o for o in _hookable(self.optimizer) for g in o.param_groups}
        if self.scale == "flow":
            return self._measure_flow(opts)
        for g, n in zip(_threshold_groups(self.optimizer), self.n_weights, strict=True):
            ms = [m for m in (self._momentum(opts[id(g)], p) for p in g["params"]) if m is not None]
            if not ms:
                vals.append(torch.zeros((), dtype=torch.float64, device=g["params"][0].device))
                continue
            seen = True
            if self.scale == "rms":  # norms in float64 without a float64 copy of m
                tot = sum(torch.linalg.vector_norm(m, 2, dtype=torch.float64) ** 2 for m in ms)
                vals.append(torch.sqrt(tot / n))
            else:
                vals.append(sum(torch.linalg.vector_norm(m, 1, dtype=torch.float64) for m in ms) / n)
        if not seen:
            return None
        device = vals[0].device
        return torch.stack([v.to(device) for v in vals])

    @torch.no_grad()
    def _measure_flow(self, opts: dict) -> Tensor | None:
        """``scale="flow"``: [mean|m_{t−1}| per layer, RMS(Δm_t) per layer] as one device tensor (2L values), with
        Δm_t = γ·(g_t − m_{t−1}) the step Bop is about to take (pre-step: the gradient is there, m not yet updated)."""
        means, steps, seen = [], [], False
        for g, n in zip(_threshold_groups(self.optimizer), self.n_weights, strict=True):
            opt = opts[id(g)]
            gamma = g.get("gamma")
            dev = g["params"][0].device
            l1 = torch.zeros((), dtype=torch.float64, device=dev)
            sq = torch.zeros((), dtype=torch.float64, device=dev)
            for p in g["params"]:
                m = self._momentum(opt, p)
                if m is None or p.grad is None:
                    continue
                if gamma is None:
                    raise BnnProbeError("normalized thresholds with scale='flow' need the group's 'gamma'")
                seen = True
                l1 = l1 + torch.linalg.vector_norm(m, 1, dtype=torch.float64)
                sq = sq + torch.linalg.vector_norm(p.grad - m, 2, dtype=torch.float64) ** 2
            means.append(l1 / n)
            steps.append(float(gamma or 0.0) * torch.sqrt(sq / n))
        if not seen:
            return None
        device = means[0].device
        return torch.stack([v.to(device) for v in means + steps])

    def _taus(self) -> list[float]:
        """τ_l from the bias-corrected EMA: k·s_l, or for ``scale="flow"`` max(k·s_l − ρ·δ_l, 0) (one host copy)."""
        est = (self._ema / self._weight).tolist()
        n = len(self.layers)
        ks = [self.multiple * math.exp(c) for c in self.log_c]
        if self.scale != "flow":
            return [k * v for k, v in zip(ks, est, strict=True)]
        return [max(k * s - OVERSHOOT_RHO * d, 0.0) for k, s, d in zip(ks, est[:n], est[n:], strict=True)]

    def _post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """``balance``: after the step (of the last inner optimizer), count its flips."""
        if optimizer is _hookable(self.optimizer)[-1] and self._counter.count(_threshold_groups(self.optimizer)):
            self._counted += 1

    def _rebalance(self) -> None:
        """``balance``: one update of the allocation factors c_l from the window's flips (one host copy); the rule
        is in the class docstring."""
        if self._counted == 0:
            return
        flips = self._counter.flips.tolist()
        self._counter.flips.zero_()
        lam = self.BALANCE_FORGET
        logs = []
        for i, n in enumerate(self.n_weights):
            self._flip_sum[i] = lam * self._flip_sum[i] + flips[i]
            self._count_sum[i] = lam * self._count_sum[i] + self._counted * n
            logs.append(math.log((self._flip_sum[i] + 0.5) / self._count_sum[i]))
        self._counted = 0
        mean = sum(logs) / len(logs)
        new = []
        for i, (c, e) in enumerate(zip(self.log_c, logs, strict=True)):
            err = e - mean
            sgn = (err > 0) - (err < 0)
            if sgn and sgn == -self._last_sign[i]:
                self._trust[i] = max(0.5 * self._trust[i], self.BALANCE_MIN_STEP)
            elif sgn and sgn == self._last_sign[i]:
                self._trust[i] = min(1.2 * self._trust[i], self.BALANCE_MAX_STEP)
            self._last_sign[i] = sgn
            new.append(c + sgn * min(self.balance * abs(err), self._trust[i]))
        centre = sum(new) / len(new)
        lim = self.BALANCE_LIMIT
        self.log_c = [min(max(c - centre, -lim), lim) for c in new]

    @torch.no_grad()
    def _pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if optimizer is not _hookable(self.optimizer)[0]:  # a wrapper's later inner optimizers: once per step
            return
        self._pre_update()
        if self.balance > 0:
            self._counter.mark(_threshold_groups(self.optimizer))

    def _pre_update(self) -> None:
        a = self._measure()
        done = self.step_count
        self.step_count += 1
        if a is None:
            return
        if self._ema is None:
            self._ema = torch.zeros_like(a)
        self._ema.mul_(1 - self.beta).add_(a, alpha=self.beta)
        self._weight = (1 - self.beta) * self._weight + self.beta
        self.n_updates += 1
        if self.n_updates > 1 and done % self.every:
            return
        if self.balance > 0:
            self._rebalance()
        taus = self._taus()
        changed = False
        for g, tau in zip(_threshold_groups(self.optimizer), taus, strict=True):
            if math.isfinite(tau) and (tau > 0 or (self.scale == "flow" and tau == 0)):
                g["threshold"] = float(tau)
                changed = True
        if changed:
            self.history.append((done, self.thresholds()))

    def state_dict(self) -> dict[str, Any]:
        """The EMA (for resumed runs; the thresholds themselves live in the optimizer's groups)."""
        state = {"ema": None if self._ema is None else self._ema.tolist(), "weight": self._weight,
                 "n_updates": self.n_updates, "step_count": self.step_count,
                 "history": [(s, dict(t)) for s, t in self.history]}
        if self.balance > 0:
            state.update(log_c=list(self.log_c), flip_sum=list(self._flip_sum), count_sum=list(self._count_sum),
                         trust=list(self._trust), last_sign=list(self._last_sign),
                         window_flips=self._counter.flips.tolist(), window_steps=self._counted)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = _threshold_groups(self.optimizer)[0]["params"][0].device
        ema = state.get("ema")
        self._ema = None if ema is None else torch.tensor(ema, dtype=torch.float64, device=device)
        self._weight = float(state["weight"])
        self.n_updates = int(state["n_updates"])
        self.step_count = int(state["step_count"])
        self.history = [(int(s), dict(t)) for s, t in state["history"]]
        if self.balance > 0 and "log_c" in state:
            n = len(self.layers)
            for key in ("log_c", "flip_sum", "count_sum", "window_flips", "trust", "last_sign"):
                if len(state[key]) != n:
                    raise BnnProbeError(f"normalized thresholds: the saved {key} has {len(state[key])} layers, the "
                                        f"optimizer {n}")
            self.log_c = [float(x) for x in state["log_c"]]
            self._flip_sum = [float(x) for x in state["flip_sum"]]
            self._count_sum = [float(x) for x in state["count_sum"]]
            self._trust = [float(x) for x in state["trust"]]
            self._last_sign = [int(x) for x in state["last_sign"]]
            flips = self._counter.flips
            flips.copy_(torch.tensor([float(x) for x in state["window_flips"]], dtype=flips.dtype))
            self._counted = int(state["window_steps"])
