"""The reference training loop behind ``bnn-probe train`` and the study presets.

One run = one :class:`TrainConfig`: build the data (:mod:`bnn_probe.data`) and a reference model
(:func:`bnn_probe.models.build_model`), initialise the binary weights, build the optimizer
(:func:`build_optimizer`), attach the probe (:func:`bnn_probe.attach`) and train, logging the per-step training loss
and the per-epoch train/validation loss and accuracy through ``probe.log``. Every option is stored in the run's
``meta.json`` under ``config`` (resolved: defaults that depend on the optimizer are filled in).

Python use::

    from bnn_probe.train import TrainConfig, train
    path = train(TrainConfig(optimizer="bop", gamma=1e-3, threshold=1e-6, epochs=5), "runs/bop")

Defaults (docs/training.md explains each): the paper's CIFAR-10 recipe (Helwegen et al. 2019, Sec. 5.2) —
γ = 1e-4, τ = 1e-8, batch 50, Adam 1e-2 for the real-valued parameters, latent baseline Adam 1e-3 with Glorot
learning-rate scaling and clipping — on the embedded ``digits`` data with a 64-256-256-10 binary MLP for 20 epochs.
The learning-rate/γ decay (×0.1 every 100 of 500 epochs in the paper) is off by default (``decay_every=0``).

Seams for later work: :func:`build_optimizer` takes an optional threshold ``policy`` (per-layer τ param groups,
:mod:`bnn_probe.optim.thresholds`); :class:`TrainState` holds everything a resumed or distributed run needs (model,
optimizer, probe, epoch/step counters, the batch-order generator) and :func:`run_epoch` advances it by one epoch.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DATASETS, Dataset, load_dataset
from .errors import BnnProbeError
from .interventions import apply_intervention
from .latent_network import latent_network_metrics
from .models import MODEL_NAMES, build_model
from .nn import STE_MODES, named_binary_parameters
from .rundir import LOCK_NAME, OwnedFiles, RunLock, is_run_folder, owned_files, remove_owned
from .safe_text import terminal_safe

__all__ = [
    "TrainConfig",
    "TrainState",
    "OPTIMIZERS",
    "DecoupledSGD",
    "StepDecay",
    "parse_widths",
    "build_optimizer",
    "init_binary_weights",
    "setup",
    "run_epoch",
    "evaluate",
    "train",
    "resume_training",
    "prepare_out_dir",
    "check_out_dir",
]

OPTIMIZERS: tuple[str, ...] = ("bop", "bop2nd", "latent-adam", "latent-sgd")
BOP_OPTIMIZERS: tuple[str, ...] = ("bop", "bop2nd")
LATENT_OPTIMIZERS: tuple[str, ...] = ("latent-adam", "latent-sgd")
DEFAULT_LR = {"latent-adam": 1e-3, "latent-sgd": 1e-1}
LATENT_INITS: tuple[str, ...] = ("glorot", "uniform1")  # initial latent magnitude bound (init_binary_weights)
EVAL_BATCH = 1000


def parse_widths(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"2048,64,1024"`` → ``(2048, 64, 1024)``; raises :class:`BnnProbeError` on anything else.

    >>> parse_widths("256, 32")
    (256, 32)
    """
    if text is None:
        return ()
    if not isinstance(text, str):
        items = list(text)
    else:
        items = [s.strip() for s in text.split(",")]
    try:
        widths = tuple(int(s) for s in items)
    except (TypeError, ValueError):
        raise BnnProbeError(f"--widths must be comma-separated positive integers like 2048,64,1024; got {text!r}") \
            from None
    if not widths or any(w <= 0 for w in widths):
        raise BnnProbeError(f"--widths must be comma-separated positive integers like 2048,64,1024; got {text!r}")
    return widths


@dataclass
class TrainConfig:
    """Every option of one training run (the ``bnn-probe train`` options, one field each).

    Fields left ``None`` get a default that depends on the optimizer when the run starts (:meth:`resolved`); options
    that do not apply to the chosen optimizer are stored as ``None`` (e.g. ``gamma`` for latent-weight runs).
    """

    # model and data
    model: str = "mlp"
    widths: tuple[int, ...] = (256, 256)
    width_multiplier: float = 1.0
    batch_norm: bool = True
    weight_scale: str = "none"
    dataset: str = "digits"
    data_dir: str | None = None
    # optimizer
    optimizer: str = "bop"
    gamma: float | None = None  # Bop/Bop2ndOrder: 1e-4 (paper)
    threshold: float | None = None  # Bop/Bop2ndOrder: 1e-8 (paper)
    threshold_policy: str = "global"  # per-layer τ: global, fan-in, calibrated, from-report, normalized, one-layer
    fan_in_exponent: float = 0.5  # fan-in policy: τ_l = τ · (n_ref / n_l)^a
    target_flip_ratio: float | None = None  # calibrated policy: the flip ratio each layer is held at
    thresholds_csv: str | None = None  # from-report policy: a report's tables/thresholds.csv (PATH#RUN picks a run)
    threshold_multiple: float | None = None  # normalized policy: τ_l = k · (EMA of layer l's mean |m|); None: 2
    threshold_scale: str | None = None  # normalized policy's scale: "mean_abs" (None), "rms" or "flow" (thresholds.md)
    threshold_balance: float | None = None  # normalized policy: allocation feedback gain κ (None: 0, off)
    threshold_every: int | None = None  # calibrated / normalized: steps between the controller's updates (None: 10)
    threshold_layer: str | None = None  # one-layer policy: the layer whose τ is scaled (one-layer τ sweep)
    threshold_layer_factor: float = 1.0  # one-layer policy: τ_layer = factor · τ
    sigma: float | None = None  # Bop2ndOrder: 1e-4
    lr: float | None = None  # latent weights: Adam 1e-3 (paper), SGD 1e-1 (both Glorot-scaled by default)
    lr_real: float = 1e-2  # Adam for batch norm and biases (paper)
    decay_every: int = 0  # epochs between ×decay_factor steps of γ, lr and lr_real; 0 = constant
    decay_factor: float = 0.1
    clip: bool | None = None  # latent: clip to [-1, 1] after every step (default True)
    ste: str = "clipped"
    init_scale: float | None = None  # latent: |w̃_0| ~ U(0, s]; None = the bound of ``latent_init``
    latent_init: str = "glorot"  # latent: "glorot" s = sqrt(6/(fan_in+fan_out)) per layer; "uniform1" s = 1 (BinaryNet)
    glorot_lr: bool | None = None  # latent: BinaryNet per-layer lr scaling (default on)
    momentum: float | None = None  # latent-sgd momentum (default 0)
    decoupled_decay: float | None = None  # latent-sgd: w̃ ← (1 − lr·d) w̃ before each step (default 0)
    weight_decay: float = 0.0  # L2 on the real-valued parameters (and on latent weights for latent optimizers)
    # schedule
    epochs: int = 20
    batch_size: int = 50
    seed: int = 0
    device: str = "cpu"
    amp: str = "none"  # autocast: none, bf16, fp16 (bnn_probe.parallel; weights and optimizer state stay fp32)
    compile: bool = False  # torch.compile the model's forward
    threads: int | None = None  # torch CPU threads (None: torch's choice; the count used is checkpointed)
    # probe cadence
    probe_every: int = 1
    hist_every: int = 100
    snapshot_every: int = 1000
    track: int = 64
    quantile_every: int = 10  # the steps table's quantile columns on logged steps that are multiples of N (else NaN)
    # bookkeeping
    tag: str | None = None
    pair: str | None = None
    pair_role: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # experiments on the inertia interpretation (bnn_probe.interventions, bnn_probe.latent_network)
    intervention: dict[str, Any] | None = None  # {"pair", "role": control|reset, "step": T, "mode"}: reset at step T
    latent_eval: bool | None = None  # latent: evaluate the latent network every epoch (default off)

    def resolved(self) -> TrainConfig:
        """A validated copy with the optimizer-dependent defaults filled in (raises :class:`BnnProbeError`)."""
        _check_types(self)
        c = replace(self, widths=parse_widths(self.widths) if self.model == "mlp" else tuple(self.widths or ()),
                    extra=dict(self.extra))
        _validate(c)
        bop, latent = c.optimizer in BOP_OPTIMIZERS, c.optimizer in LATENT_OPTIMIZERS
        sgd = c.optimizer == "latent-sgd"
        c.gamma = (1e-4 if c.gamma is None else float(c.gamma)) if bop else None
        c.threshold = (1e-8 if c.threshold is None else float(c.threshold)) if bop else None
        c.sigma = (1e-4 if c.sigma is None else float(c.sigma)) if c.optimizer == "bop2nd" else None
        c.lr = (DEFAULT_LR[c.optimizer] if c.lr is None else float(c.lr)) if latent else None
        c.clip = (True if c.clip is None else bool(c.clip)) if latent else None
        c.init_scale = (None if c.init_scale is None else float(c.init_scale)) if latent else None
        c.latent_init = c.latent_init if latent else None  # type: ignore[assignment]
        c.glorot_lr = (True if c.glorot_lr is None else bool(c.glorot_lr)) if latent else None
        c.momentum = (0.0 if c.momentum is None else float(c.momentum)) if sgd else None
        c.decoupled_decay = (0.0 if c.decoupled_decay is None else float(c.decoupled_decay)) if sgd else None
        c.latent_eval = bool(c.latent_eval) if latent else None
        if c.model != "mlp":
            c.widths = ()
        return c

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (stored as the run's ``config``)."""
        d = asdict(self)
        d["widths"] = list(d["widths"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (unknown keys are refused)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BnnProbeError(f"unknown training options: {', '.join(unknown)}")
        d = dict(d)
        if "widths" in d and d["widths"] is not None:
            d["widths"] = tuple(d["widths"])
        return cls(**d)


MAX_SEED = 2**63 - 1  # torch.Generator takes seeds below 2^64; seed·2 + 1 and seed + 7919 must stay in range
MAX_COUNT = 2**31 - 1  # epochs, batch size, cadences
MAX_THREADS = 4096
MAX_WIDTH = 1 << 20  # one hidden layer of 2^20 units
MAX_WIDTH_MULTIPLIER = 64.0
MAX_RATE = 1e6  # γ, τ, σ, learning rates, scales and decays: finite and bounded, so products stay finite


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BnnProbeError(message)


_STR_FIELDS = ("model", "dataset", "optimizer", "ste", "weight_scale", "device", "amp", "threshold_policy")
_OPTIONAL_STR_FIELDS = ("data_dir", "thresholds_csv", "tag", "pair", "pair_role")


def _check_types(c: TrainConfig) -> None:
    """Options of the wrong type (a crafted or hand-edited meta.json resumed) are one-line errors."""
    for name in _STR_FIELDS + _OPTIONAL_STR_FIELDS:
        v = getattr(c, name)
        _check(isinstance(v, str) or (v is None and name in _OPTIONAL_STR_FIELDS),
               f"option {name} must be a string, got {type(v).__name__} {v!r:.40}")
    for name in ("batch_norm", "compile", "clip", "glorot_lr", "latent_eval"):
        v = getattr(c, name)
        _check(isinstance(v, bool) or (v is None and name in ("clip", "glorot_lr", "latent_eval")),
               f"option {name} must be true or false, got {v!r:.40}")
    _check(isinstance(c.extra, dict), f"option extra must be a mapping, got {type(c.extra).__name__}")
    _check(c.widths is None or isinstance(c.widths, str | list | tuple),
           f"option widths must be a list of integers, got {c.widths!r:.40}")


def _validate(c: TrainConfig) -> None:
    _check(c.model in MODEL_NAMES, f"unknown model {c.model!r}: choose one of {', '.join(MODEL_NAMES)}")
    _check(c.dataset in DATASETS, f"unknown dataset {c.dataset!r}: choose one of {', '.join(DATASETS)}")
    _check(c.optimizer in OPTIMIZERS, f"unknown optimizer {c.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    _check(c.ste in STE_MODES, f"unknown STE {c.ste!r}: choose one of {', '.join(STE_MODES)}")
    _check(_int_in(c.epochs, 0, MAX_COUNT),
           f"--epochs must be a non-negative integer (at most {MAX_COUNT}), got {c.epochs}")
    _check(_int_in(c.batch_size, 2, MAX_COUNT), f"--batch-size must be at least 2 (and at most {MAX_COUNT}), got "
                                                f"{c.batch_size}")
    _check(_int_in(c.seed, 0, MAX_SEED), f"--seed must be a non-negative integer of at most {MAX_SEED} (2^63 − 1, the "
                                         f"generators' range), got {c.seed}")
    _check(c.threads is None or _int_in(c.threads, 1, MAX_THREADS),
           f"--threads must be a positive integer (at most {MAX_THREADS}), got {c.threads}")
    _check(all(_int_in(w, 1, MAX_WIDTH) for w in c.widths),
           f"--widths must be comma-separated positive integers of at most {MAX_WIDTH}, got "
           f"{','.join(map(str, c.widths))}")
    for name in ("width_multiplier", "fan_in_exponent", "decay_factor", "target_flip_ratio"):
        v = getattr(c, name)
        _check(v is None or _finite(v), f"--{name.replace('_', '-')} must be a finite number, got {v}")
    _check(c.width_multiplier <= MAX_WIDTH_MULTIPLIER,
           f"--width-multiplier must be at most {MAX_WIDTH_MULTIPLIER}, got {c.width_multiplier}")
    _check(c.momentum is None or (_finite(c.momentum) and c.momentum < 1), f"--momentum must be below 1, got "
                                                                          f"{c.momentum}")
    _check(c.data_dir is None or c.dataset == "cifar10",
           f"--data-dir is only read for --dataset cifar10 ({c.dataset} needs no files): drop it or use cifar10")
    _check(c.width_multiplier > 0, f"--width-multiplier must be positive, got {c.width_multiplier}")
    _check(_int_in(c.decay_every, 0, MAX_COUNT),
           f"--decay-every must be a non-negative number of epochs (at most {MAX_COUNT}), got {c.decay_every}")
    _check(0 < c.decay_factor <= 1, f"--decay-factor must be in (0, 1], got {c.decay_factor}")
    for name in ("gamma", "threshold", "sigma", "lr", "lr_real", "init_scale", "momentum", "decoupled_decay",
                 "weight_decay"):
        v = getattr(c, name)
        _check(v is None or (_finite(v) and 0 <= v <= MAX_RATE),
               f"--{name.replace('_', '-')} must be a non-negative number (at most {MAX_RATE:g}), got {v}")
    _check(c.gamma is None or c.gamma <= 1, f"--gamma must be at most 1, got {c.gamma}")
    _check(c.sigma is None or c.sigma <= 1, f"--sigma must be at most 1, got {c.sigma}")
    _check(c.init_scale is None or c.init_scale > 0, "--init-scale must be positive")
    _check(c.latent_init in (None, *LATENT_INITS),
           f"--latent-init must be one of {', '.join(LATENT_INITS)}, got {c.latent_init!r}")
    for name in ("probe_every", "hist_every", "snapshot_every", "track", "quantile_every"):
        v = getattr(c, name)
        _check(_int_in(v, 0, MAX_COUNT),
               f"--{name.replace('_', '-')} must be a non-negative integer (at most {MAX_COUNT}), got {v}")
    _check(c.pair_role in (None, "a", "b"), f"pair_role must be 'a' or 'b', got {c.pair_role!r}")
    from .interventions import BOP_MODES, LATENT_MODES, check_intervention

    c.intervention = check_intervention(c.intervention)
    modes = BOP_MODES if c.optimizer in BOP_OPTIMIZERS else LATENT_MODES
    _check(c.intervention is None or c.intervention["mode"] in modes,
           f"--reset-inertia-mode for {c.optimizer} must be one of {', '.join(modes)}, got "
           f"{(c.intervention or {}).get('mode')!r}")
    _check(c.amp in ("none", "bf16", "fp16"), f"--amp must be none, bf16 or fp16, got {c.amp!r}")
    try:
        torch.device(c.device)
    except (RuntimeError, ValueError, TypeError):
        raise BnnProbeError(f"--device must be a torch device like cpu, cuda or cuda:1, got {c.device!r}") from None
    _check(c.threshold_policy in ("global", "fan-in", "calibrated", "from-report", "normalized", "one-layer"),
           f"--threshold-policy must be global, fan-in, calibrated, from-report, normalized or one-layer, got "
           f"{c.threshold_policy!r}")
    _check(isinstance(c.threshold_layer_factor, int | float) and math.isfinite(c.threshold_layer_factor)
           and c.threshold_layer_factor > 0,
           f"--threshold-layer-factor must be a positive number, got {c.threshold_layer_factor}")
    _check(c.threshold_multiple is None or (isinstance(c.threshold_multiple, int | float)
                                            and math.isfinite(c.threshold_multiple) and c.threshold_multiple > 0),
           f"--threshold-multiple must be a positive number, got {c.threshold_multiple}")
    _check(c.threshold_scale in (None, "mean_abs", "rms", "flow"),
           f"--threshold-scale must be mean_abs, rms or flow, got {c.threshold_scale!r}")
    _check(c.threshold_scale in (None, "mean_abs") or (c.threshold_policy == "normalized" and c.optimizer == "bop"),
           "--threshold-scale flow is for --threshold-policy normalized with --optimizer bop")
    _check(c.threshold_balance is None or (isinstance(c.threshold_balance, int | float)
                                           and math.isfinite(c.threshold_balance) and c.threshold_balance >= 0),
           f"--threshold-balance must be a number >= 0, got {c.threshold_balance}")
    _check(not c.threshold_balance or c.threshold_policy == "normalized",
           "--threshold-balance is for --threshold-policy normalized")
    _check(c.threshold_every is None or (isinstance(c.threshold_every, int) and c.threshold_every >= 1),
           f"--threshold-every must be a positive integer, got {c.threshold_every}")
    _check(c.threshold_every is None or c.threshold_policy in ("calibrated", "normalized"),
           "--threshold-every is for --threshold-policy calibrated or normalized")


# ----------------------------------------------------------------------------------------------------------------------
# optimizers


class DecoupledSGD(torch.optim.SGD):
    """``torch.optim.SGD`` plus a decoupled decay ``decoupled_decay`` = d per group, applied before the SGD step:

        w̃ ← (1 − lr·d) · w̃,   then   w̃ ← w̃ − lr · g   (with momentum/weight decay as torch's SGD)

    With lr = γ, d = 1 and no momentum this is w̃_t = (1 − γ) w̃_{t−1} − γ g_t, the latent-weight form of Bop at
    τ = 0 (Helwegen et al. 2019, Sec. 3): w̃ = −m exactly when both start from zero, computed with the same
    ``mul_``/``add_`` ops as :class:`bnn_probe.optim.Bop`.
    """

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0,
                 decoupled_decay: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        for g in self.param_groups:
            g.setdefault("decoupled_decay", float(decoupled_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        for g in self.param_groups:
            d = g.get("decoupled_decay", 0.0)
            if d:
                ps = [p for p in g["params"] if p.grad is not None]
                if ps:
                    torch._foreach_mul_(ps, 1.0 - g["lr"] * d)
        return super().step(closure)


def _binary_groups(model: nn.Module, config: TrainConfig, policy: Any | None) -> list[dict[str, Any]]:
    """One param group per binary layer, carrying ``layer`` (the parameter's name, as the probe logs it)."""
    named = list(named_binary_parameters(model))
    if not named:
        raise BnnProbeError(f"model {config.model!r} has no binary parameters")
    if config.optimizer in BOP_OPTIMIZERS:
        from .optim import thresholds

        pol = policy if policy is not None else thresholds.global_threshold(config.threshold)
        opts: dict[str, Any] = {"gamma": config.gamma}
        if config.optimizer == "bop2nd":
            opts["sigma"] = config.sigma
        return pol.param_groups(named, **opts)
    from .optim import glorot_lr_scale

    groups = []
    for name, p in named:
        scale = glorot_lr_scale(p) if config.glorot_lr else 1.0
        groups.append({"params": [p], "lr": config.lr * scale, "lr_scale": scale, "layer": name})
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig, policy: Any | None = None) -> torch.optim.Optimizer:
    """The optimizer of a run: a :class:`bnn_probe.optim.CaseOptimizer` with the binary weights' optimizer first
    (one param group per binary layer) and Adam(``lr_real``) for every other parameter (batch norm, biases).

    * ``bop`` / ``bop2nd``: :class:`~bnn_probe.optim.Bop` / :class:`~bnn_probe.optim.Bop2ndOrder` with ``gamma``,
      ``threshold`` (``sigma``); per-layer τ come from ``policy`` (a
      :class:`bnn_probe.optim.thresholds.ThresholdPolicy`; default: one global τ = ``config.threshold``).
    * ``latent-adam``: Adam(``lr``, Glorot-scaled per layer when ``glorot_lr``), coupled ``weight_decay``.
    * ``latent-sgd``: :class:`DecoupledSGD` (``lr``, ``momentum``, ``weight_decay``, ``decoupled_decay``).
    * latent optimizers with ``clip``: a :class:`~bnn_probe.optim.LatentClipper` (bound 1) on the wrapper, so the
      probe sees the clip bound (``optimizer.bnn_clip_value``) and measures after clipping.

    ``config`` must be :meth:`TrainConfig.resolved`.
    """
    from .optim import Bop, Bop2ndOrder, CaseOptimizer, LatentClipper

    groups = _binary_groups(model, config, policy)
    binary_ids = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in binary_ids]
    if config.optimizer == "bop":
        bin_opt: torch.optim.Optimizer = Bop(groups, gamma=config.gamma, threshold=config.threshold)
    elif config.optimizer == "bop2nd":
        bin_opt = Bop2ndOrder(groups, gamma=config.gamma, sigma=config.sigma, threshold=config.threshold)
    elif config.optimizer == "latent-adam":
        bin_opt = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        bin_opt = DecoupledSGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               decoupled_decay=config.decoupled_decay)
    children = [bin_opt]
    if rest:
        children.append(torch.optim.Adam(rest, lr=config.lr_real, weight_decay=config.weight_decay))
    opt = CaseOptimizer(*children)
    if config.optimizer in LATENT_OPTIMIZERS:
        if config.clip:
            LatentClipper(opt, bound=1.0)
        else:
            opt.bnn_clip_value = None  # type: ignore[attr-defined]
    return opt


class StepDecay:
    """Step decay of every param group's rate (Bop's γ — ``lr`` is its alias — and the Adam/SGD learning rates):
    rate(epoch) = rate_0 · factor^⌊epoch / every⌋ (the paper: ×0.1 every 100 epochs). ``every = 0``: constant.

    Stateless apart from the initial rates, so a resumed run only needs the epoch.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, every: int, factor: float) -> None:
        self.optimizer, self.every, self.factor = optimizer, int(every), float(factor)
        self.base = [float(g["lr"]) for g in optimizer.param_groups]

    def multiplier(self, epoch: int) -> float:
        return self.factor ** (epoch // self.every) if self.every > 0 else 1.0

    def apply(self, epoch: int) -> None:
        """Set every group's rate for ``epoch`` (0-based)."""
        k = self.multiplier(epoch)
        for g, base in zip(self.optimizer.param_groups, self.base, strict=True):
            g["lr"] = base * k


@torch.no_grad()
def init_binary_weights(model: nn.Module, config: TrainConfig) -> None:
    """Initial binary weights. Every optimizer starts from the same signs for a seed: ±1 drawn by
    :func:`bnn_probe.optim.binary_init_` from a generator seeded with ``seed``.

    Latent optimizers multiply them by magnitudes |w̃_0| = s·u, u ~ U(0, 1] drawn from a second seeded generator, so
    w̃_0 ~ U(−s, s). s = ``init_scale`` when given, else by ``latent_init``: ``"glorot"`` (default) the Glorot-uniform
    bound sqrt(6 / (fan_in + fan_out)) of each layer; ``"uniform1"`` s = 1, BinaryNet's U(−1, 1) with clipping at 1
    (Courbariaux, Hubara et al. 2016) — 7–19× larger for the reference models' layers, and by Theorem 1 of Helwegen
    et al. (2019) that ratio is the starting inertia relative to the step size. Scaling ``init_scale`` by a power of
    two scales w̃_0 exactly (Theorem 1 pairs).
    """
    from .optim import binary_init_

    params = [p for _, p in named_binary_parameters(model)]
    binary_init_(params, seed=config.seed)
    if config.optimizer in LATENT_OPTIMIZERS:
        g = torch.Generator().manual_seed(config.seed + 7919)
        for p in params:
            if config.init_scale is not None:
                s = config.init_scale
            elif config.latent_init == "uniform1":
                s = 1.0
            else:
                fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(p)
                s = math.sqrt(6.0 / (fan_in + fan_out))
            u = 1.0 - torch.rand(p.shape, generator=g)  # (0, 1]: never a zero magnitude (sign(0) = +1)
            p.mul_((u * s).to(p.device, p.dtype))


# ----------------------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainState:
    """Everything a run's loop needs, in one place (what a resumed or distributed run would save/restore)."""

    config: TrainConfig
    out_dir: Path
    data: Dataset
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: StepDecay
    probe: Any
    generator: torch.Generator  # batch order
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[dict[str, float]] = field(default_factory=list)  # per-epoch metrics
    runtime: Any = None  # bnn_probe.parallel.Runtime: DDP shard, autocast, compile (None: plain one-process step)
    lock: Any = None  # bnn_probe.rundir.RunLock held on out_dir while this process writes it (global rank 0)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        yy = y[i:i + batch_size]
        loss_sum += F.cross_entropy(out, yy, reduction="sum").double()
        correct += (out.argmax(1) == yy).sum()
    model.train(was_training)
    n = max(1, len(x))
    return float(loss_sum) / n, float(correct) / n


def check_out_dir(out_dir: str | Path, overwrite: bool = False) -> OwnedFiles | None:
    """Check that ``out_dir`` may receive a new run, without changing anything: absent or empty (``None``), or (with
    ``overwrite``) a bnn-probe run whose owned files (:func:`bnn_probe.rundir.owned_files`) are returned, to be
    deleted once the new run is ready. A folder holding anything else, or a link, is refused."""
    out = Path(out_dir)
    if out.is_symlink() and overwrite:
        raise BnnProbeError(f"--out {out} is a symbolic link: --overwrite never follows links; give the real folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if not out.is_dir() or not any(e.name != LOCK_NAME for e in out.iterdir()):
        return None
    if not (out / "meta.json").is_file():
        raise FileExistsError(f"{out} is not empty and holds no run; choose another --out")
    if not is_run_folder(out):
        raise FileExistsError(f"{out} is not empty and holds no bnn-probe run (its meta.json is not of format "
                              "bnn-probe-run); choose another --out")
    if not overwrite:
        raise FileExistsError(f"{out} already holds a run; choose another --out or pass --overwrite")
    return owned_files(out)


def _replace_run(out: Path, overwrite: bool) -> None:
    """Under the run's lock: check ``out`` again and delete the previous run's owned files; tell what was kept."""
    plan = check_out_dir(out, overwrite)
    if plan is None:
        return
    remove_owned(plan)
    if plan.foreign:
        names = terminal_safe(", ".join(str(p.relative_to(out)) for p in plan.foreign[:5]), one_line=True)
        more = f" and {len(plan.foreign) - 5} more" if len(plan.foreign) > 5 else ""
        sys.stderr.write(f"Warning: --overwrite kept {len(plan.foreign)} file(s) in {out} that bnn-probe did not "
                         f"write: {names}{more}\n")


def prepare_out_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Check that ``out_dir`` may receive a new run: absent or empty, or (with ``overwrite``) a previous bnn-probe
    run whose own files are then removed (:func:`check_out_dir`). A folder holding anything else is never touched;
    files bnn-probe did not write are kept."""
    out = Path(out_dir)
    if check_out_dir(out, overwrite) is not None:
        with RunLock(out):
            _replace_run(out, overwrite)
    return out


def setup(config: TrainConfig, out_dir: str | Path, overwrite: bool = False, policy: Any | None = None,
          data: Dataset | None = None, resume: bool = False, lock: RunLock | None = None,
          **probe_options: Any) -> TrainState:
    """Resolve the config, load data, build and initialise the model and optimizer, attach the probe.
    Under torchrun, join the process group (docs/distributed.md); ``resume``: append to the run in ``out_dir``.

    ``out_dir`` is checked first and changed only once the data, model and optimizer are ready: then (global rank 0)
    its lock is taken (:class:`bnn_probe.rundir.RunLock`; ``lock``: one already held) and, with ``overwrite``, the
    previous run's own files are deleted (:func:`check_out_dir`)."""
    import bnn_probe

    from .parallel import Runtime, init_distributed, sync_batchnorm

    c = config.resolved()
    device = torch.device(c.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BnnProbeError(f"--device {c.device}: CUDA is not available on this machine")
    info = init_distributed(c.device)
    device = torch.device(info.device)
    out = Path(out_dir)
    if info.is_main and not resume:
        check_out_dir(out, overwrite)
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    if data is None:
        data = load_dataset(c.dataset, c.data_dir, layout="image" if c.model == "binarynet" else "flat")
    data = data.to(device)
    total = c.epochs * data.steps_per_epoch(c.batch_size)
    if c.intervention and c.intervention["step"] >= total:
        raise BnnProbeError(f"--reset-inertia-step {c.intervention['step']} is not before the run's last step "
                            f"({total} = {c.epochs} epochs × {data.steps_per_epoch(c.batch_size)} steps)")
    torch.manual_seed(c.seed)
    try:
        model = build_model(c.model, in_shape=data.in_shape, num_classes=data.num_classes, widths=c.widths or None,
                            width_multiplier=c.width_multiplier, batch_norm=c.batch_norm, ste=c.ste,
                            scale=c.weight_scale)
    except ValueError as e:
        raise BnnProbeError(str(e)) from None
    model.to(device)
    init_binary_weights(model, c)
    if info.distributed:
        model = sync_batchnorm(model, device)
    if policy is None and c.optimizer in BOP_OPTIMIZERS and c.threshold_policy != "global":
        from .optim.thresholds import policy_for_model

        policy = policy_for_model(model, c.threshold_policy, threshold=c.threshold, fan_in_exponent=c.fan_in_exponent,
                                  target_flip_ratio=c.target_flip_ratio, thresholds_csv=c.thresholds_csv,
                                  threshold_multiple=c.threshold_multiple, threshold_layer=c.threshold_layer,
                                  threshold_layer_factor=c.threshold_layer_factor,
                                  threshold_scale=c.threshold_scale or "mean_abs",
                                  threshold_balance=c.threshold_balance or 0.0, threshold_every=c.threshold_every)
    optimizer = build_optimizer(model, c, policy)
    if policy is not None:
        policy.attach(optimizer)  # the calibrated / normalized policy's online controller (no-op for the others)
    schedule = StepDecay(optimizer, c.decay_every, c.decay_factor)
    cfg = c.to_dict()
    if policy is not None:  # the policy and its per-layer τ, in the run's config
        cfg["extra"] = {**cfg["extra"], "threshold_policy": policy.describe()}
    options = dict(every=c.probe_every, hist_every=c.hist_every, snapshot_every=c.snapshot_every, track=c.track,
                   quantile_every=c.quantile_every, config=cfg, tag=c.tag, seed=c.seed)
    options.update(probe_options)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        lock = lock if lock is not None else RunLock(out)
    try:
        if info.is_main and not resume:
            _replace_run(out, overwrite)
        probe = bnn_probe.attach(model, optimizer, out, resume=resume, **options)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    generator = torch.Generator().manual_seed(c.seed * 2 + 1)
    return TrainState(c, out, data, model, optimizer, schedule, probe, generator,
                      runtime=Runtime(model, info, c.amp, c.compile), lock=lock)


class _Bar:
    """tqdm over steps with loss and flip ratio; disabled (and free) when not on a terminal or not wanted."""

    def __init__(self, state: TrainState, progress: bool | None) -> None:
        from tqdm.auto import tqdm

        if progress is None:
            progress = sys.stderr.isatty()
        total = state.config.epochs * state.data.steps_per_epoch(state.config.batch_size)
        self.bar = tqdm(total=total, initial=state.step, disable=not progress, unit="step", leave=False,
                        desc=state.out_dir.name, dynamic_ncols=True)
        self.enabled = not self.bar.disable
        self.every = max(1, total // 200) if total else 1
        self.params = [p for _, p in named_binary_parameters(state.model)]
        self.n = max(1, sum(p.numel() for p in self.params))
        self._signs: list[Tensor] | None = None

    def before_step(self, step: int) -> None:
        if self.enabled and step % self.every == 0:
            self._signs = [p.detach() >= 0 for p in self.params]

    def after_step(self, step: int, loss: Tensor) -> None:
        if not self.enabled:
            return
        self.bar.update(1)
        if self._signs is not None:
            flips = sum(int(((p.detach() >= 0) != s).sum()) for p, s in zip(self.params, self._signs, strict=True))
            self.bar.set_postfix(loss=f"{float(loss):.3f}", flips=f"{flips / self.n:.1e}", refresh=False)
            self._signs = None

    def close(self) -> None:
        self.bar.close()


def run_epoch(state: TrainState, bar: _Bar | None = None) -> dict[str, float]:
    """Train one epoch (updates ``state.step``/``state.epoch``), log per-step ``train_loss`` and the epoch's
    ``train_loss_epoch``, ``train_accuracy`` (running, training mode), ``val_loss``, ``val_accuracy`` and the rates
    in force (``gamma`` for Bop runs, ``lr`` for latent ones, ``lr_real``); with ``latent_eval`` also the latent
    network's ``latent_val_loss``, ``latent_val_accuracy`` and ``approx_error/<layer>``
    (:func:`bnn_probe.latent_network.latent_network_metrics`). A config ``intervention`` resets the inertia (or, in
    the control arm, marks the step) right after its step T (:func:`bnn_probe.interventions.apply_intervention`)."""
    c, model, opt, probe = state.config, state.model, state.optimizer, state.probe
    epoch = state.epoch
    state.schedule.apply(epoch)
    model.train()
    losses: list[Tensor] = []
    outs: list[Tensor] = []  # the epoch's outputs and labels: the accuracy is counted once, after the epoch
    labels: list[Tensor] = []
    first_step = state.step + 1
    for x, y in state.data.batches(c.batch_size, state.generator):
        step = state.step + 1
        if bar is not None:
            bar.before_step(step)
        if state.runtime is not None:  # this rank's shard, autocast, DDP/compile, (scaled) backward and step
            out, y, loss = state.runtime.step(opt, x, y)
        else:
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        state.step = step
        if c.intervention:  # the magnitude-reset experiment: reset (or mark, in the control arm) after step T
            apply_intervention(state)
        d = loss.detach()
        losses.append(d)
        outs.append(out.detach())
        labels.append(y)
        if bar is not None:
            bar.after_step(step, d)
    correct = _count_correct(outs, labels, state.data.device)
    seen = sum(len(y) for y in labels)
    del outs, labels
    if state.runtime is not None and losses:  # under DDP: global-batch losses and accuracy (one all_reduce)
        stacked, correct, seen = state.runtime.reduce_epoch(torch.stack(losses), correct, seen)
        losses = list(stacked)
    if losses:
        per_step = torch.stack(losses).tolist()
        for i, v in enumerate(per_step):
            probe.log(step=first_step + i, epoch=epoch, train_loss=v)
    state.epoch = epoch + 1
    val_loss, val_acc = evaluate(model, state.data.x_val, state.data.y_val)
    groups = opt.param_groups
    metrics = {
        "train_loss_epoch": sum(per_step) / len(per_step) if losses else math.nan,
        "train_accuracy": float(correct) / max(1, seen),
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        ("gamma" if c.optimizer in BOP_OPTIMIZERS else "lr"): float(groups[0]["lr"]),
    }
    if len(groups) > 1 and "layer" not in groups[-1]:
        metrics["lr_real"] = float(groups[-1]["lr"])
    if c.latent_eval:  # the latent network (w̃/α in place of sign w̃) and the per-layer approximation error
        metrics.update(latent_network_metrics(model, state.data))
    probe.log(step=state.step, epoch=state.epoch, **metrics)
    state.history.append({"epoch": state.epoch, "step": state.step, **metrics})
    return metrics


def _count_correct(outs: list[Tensor], labels: list[Tensor], device: torch.device) -> Tensor:
    """Σ over the epoch's batches of #(argmax of the output = label), as an int64 tensor on ``device``: a few ops
    per epoch instead of four per step."""
    if not outs:
        return torch.zeros((), dtype=torch.int64, device=device)
    return (torch.cat(outs).argmax(1) == torch.cat(labels)).sum()


def train(config: TrainConfig, out_dir: str | Path, progress: bool | None = None, overwrite: bool = False,
          policy: Any | None = None, data: Dataset | None = None, checkpoint_every: int = 1,
          **probe_options: Any) -> Path:
    """Train one run into ``out_dir`` and return its path.

    Args:
        config: the run's options (defaults filled in by :meth:`TrainConfig.resolved`).
        out_dir: the run directory: must not exist, be empty, or (with ``overwrite``) hold a previous run.
        progress: show a tqdm bar; ``None`` = only when stderr is a terminal.
        overwrite: replace a previous run in ``out_dir``.
        policy: per-layer threshold policy for Bop runs (see :func:`build_optimizer`).
        data: an already loaded :class:`~bnn_probe.data.Dataset` (saves reloading it across runs).
        checkpoint_every: write ``out_dir/checkpoint.pt`` after setup and every this many epochs (0 = never), for
            :func:`resume_training` (:mod:`bnn_probe.resume`).
        probe_options: extra :func:`bnn_probe.attach` options (e.g. ``flush_secs``, ``tensorboard``).

    The run is marked ``failed`` in its log if training raises, ``finished`` otherwise.
    """
    state = setup(config, out_dir, overwrite=overwrite, policy=policy, data=data, **probe_options)
    return _train_loop(state, progress, checkpoint_every)


def resume_training(out_dir: str | Path, progress: bool | None = None, policy: Any | None = None,
                    data: Dataset | None = None, checkpoint_every: int = 1, threads: int | None = None,
                    **probe_options: Any) -> Path:
    """Continue the run in ``out_dir`` from its last checkpoint with the options it was started with (from step 0
    when it was killed before its first checkpoint). See :mod:`bnn_probe.resume` and docs/distributed.md.

    The run folder is locked first (a second writer gets a one-line error); the checkpoint must belong to the run
    (:func:`bnn_probe.resume.resume_state`). The CPU thread count the run used is restored (``--threads`` changes
    the last float bits of the results); ``threads`` overrides it."""
    import os

    from .resume import restore, resume_state

    out = Path(out_dir)
    if not out.is_dir():
        raise BnnProbeError(f"--resume {out_dir}: no run there (not a folder)")
    lock = RunLock(out) if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        cfg, ckpt = resume_state(out, known_options={f.name for f in fields(TrainConfig)})
        config = TrainConfig.from_dict(cfg)
        recorded = config.threads if config.threads is not None else (ckpt or {}).get("threads")
        if threads is not None and recorded is not None and threads != recorded:
            sys.stderr.write(f"Warning: the run used {recorded} CPU threads, resumed with {threads}: results may "
                             "differ from an uninterrupted run in the last float bits\n")
        n = threads if threads is not None else recorded
        if isinstance(n, int) and n >= 1:
            torch.set_num_threads(n)
        state = setup(config, out, policy=policy, data=data, resume=True, lock=lock, **probe_options)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if ckpt is not None:
        restore(state, ckpt)
    return _train_loop(state, progress, checkpoint_every, fresh=ckpt is None)


def _mark_failed(state: TrainState) -> None:
    """Close the probe as ``failed``; when the disk is full, at least write the status into meta.json (rewritten
    whole if a temporary file fits, else patched in place: :func:`bnn_probe.runlog.writer.mark_status_in_place`)."""
    from .runlog.writer import mark_status_in_place

    probe = state.probe
    try:
        probe.close("failed")
    except Exception:  # noqa: BLE001 - the original error is what the user needs to see
        probe._closed = True
        try:
            probe._write_meta()
        except Exception:  # noqa: BLE001 - no room for a temporary file
            mark_status_in_place(Path(state.out_dir) / "meta.json", "failed")


def _train_loop(state: TrainState, progress: bool | None, checkpoint_every: int, fresh: bool = True) -> Path:
    from .resume import save_checkpoint

    bar = _Bar(state, progress)
    t0 = time.perf_counter()
    try:
        try:
            if checkpoint_every > 0 and fresh and state.step == 0:
                save_checkpoint(state)
            while state.epoch < state.config.epochs:
                run_epoch(state, bar)
                if checkpoint_every > 0 and state.epoch % checkpoint_every == 0:
                    save_checkpoint(state)
        except BaseException as e:
            bar.close()
            _mark_failed(state)
            if isinstance(e, OSError):  # disk full, folder removed, ...: one line, the run marked failed
                raise BnnProbeError(f"training of {state.out_dir} stopped: {_os_error(e)} (the run is marked "
                                    "failed where its meta.json could still be written)") from None
            raise
        bar.close()
        state.probe.log(step=state.step, epoch=state.epoch, wall_seconds=time.perf_counter() - t0)
        try:
            state.probe.close("finished")
        except OSError as e:
            _mark_failed(state)
            raise BnnProbeError(f"could not finish writing {state.out_dir}: {_os_error(e)}") from None
    finally:
        if state.lock is not None:
            state.lock.release()
    return state.out_dir


def _os_error(e: OSError) -> str:
    """``[Errno 28] No space left on device: 'path'`` as one short line."""
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where}"
