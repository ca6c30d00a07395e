"""Study presets: named grids of :class:`~bnn_probe.train.TrainConfig` runs, written side by side and reported.

A study is registered under a name with :func:`register_study`; its builder turns :class:`StudyOptions` (dataset,
epochs, seeds, quick) into a list of :class:`RunSpec` (a run name and its config). :func:`run_study` trains the runs
(in parallel processes with ``jobs > 1``) into ``out/<run name>/`` and builds the report into ``out/report/``.

Studies (docs/training.md gives every run's options):

* ``hyperparams`` — Fig. 1 of Helwegen et al. 2019: Bop with γ ∈ {1e-2, 1e-3, 1e-4} at τ = 1e-6 and
  τ ∈ {0, 1e-6, 1e-5} at γ = 1e-3 (five runs per seed; γ = 1e-3, τ = 1e-6 is shared). The paper's values are used
  unscaled: on the embedded datasets they already give distinct flip rates and trainable models (docs/results.md).
* ``inertia`` — seeds 0, 1, 2 by default: Theorem 1 with C ∈ {3, 10, 100} (latent SGD, with and without clipping, a
  rounding control; ``config["extra"]["theorem1"]``); Bop and latent Adam with clipping from the same initial signs
  (``config["extra"]["bop_vs_latent"]``; flip overlap and flip hazard); latent SGD with clipping; the τ = 0 pair (Bop
  with τ = 0 and latent SGD with step γ, decoupled decay γ and initial magnitudes 1e-20, γ = 2^-10 so both forms
  round alike; ``config["pair"]``, ``config["pair_role"]`` "a"/"b"); magnitude-reset pairs
  (:func:`intervention_runs`): control and reset arms sharing a seed, ``config["intervention"]``. The power-of-two
  Theorem-1 pair is a code test (tests/test_equivalences.py), not part of the study.
* ``thresholds`` — per-layer thresholds (wide vs thin layers; docs/thresholds.md): Bop with global
  τ ∈ {2e-7, 1e-6, 5e-6}, ``fan-in`` and ``calibrated`` (r* = 1e-3) policies, Bop2ndOrder (τ = 1e-3), latent
  Adam, Bop without batch norm (weights scaled by fan_in^−1/2), and a width sweep (MLP in → W → 256 → classes,
  W ∈ {64, 256, 1024, 4096}).
* ``all`` — the main job: a short version of every available study (one report).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import BnnProbeError
from .train import TrainConfig

__all__ = ["RunSpec", "StudyOptions", "Study", "STUDIES", "register_study", "reserve_study", "get_study",
           "plan_study", "run_study", "parse_seeds", "default_seeds", "study_names"]


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: its directory name under the study folder and its options."""

    name: str
    config: TrainConfig


@dataclass(frozen=True)
class StudyOptions:
    """Options every study takes.

    Attributes:
        dataset: ``digits`` (default), ``mnist1d`` or ``cifar10``.
        epochs: epochs per run; ``None`` = the study's default (shorter with ``quick``).
        seeds: one run of each grid point per seed.
        quick: CI-sized version (fewer epochs, probe histograms off).
        data_dir: CIFAR-10 folder.
        model: reference model (``mlp`` default; ``cnn1d`` suits mnist1d).
        widths: MLP hidden widths.
        device: torch device.
    """

    dataset: str = "digits"
    epochs: int | None = None
    seeds: tuple[int, ...] = (0,)
    quick: bool = False
    data_dir: str | None = None
    model: str = "mlp"
    widths: tuple[int, ...] = (256, 256)
    device: str = "cpu"

    def base(self, seed: int, default_epochs: int, quick_epochs: int) -> TrainConfig:
        """The study's base config for ``seed``."""
        epochs = self.epochs if self.epochs is not None else (quick_epochs if self.quick else default_epochs)
        return TrainConfig(model=self.model, widths=tuple(self.widths), dataset=self.dataset, data_dir=self.data_dir,
                           epochs=epochs, seed=seed, device=self.device)


@dataclass
class Study:
    """A named grid: ``build(options) -> [RunSpec]``. A reserved study has no builder and a ``reserved`` message."""

    name: str
    description: str
    build: Callable[[StudyOptions], list[RunSpec]] | None = None
    reserved: str | None = None
    in_all: bool = True
    all_epochs: int = 8  # epochs of this study's short version inside ``all``
    meta: dict[str, Any] = field(default_factory=dict)


STUDIES: dict[str, Study] = {}


def register_study(name: str, description: str, *, in_all: bool = True, all_epochs: int = 8):
    """Decorator registering ``build(options) -> list[RunSpec]`` as study ``name`` (replaces a reserved entry)."""

    def deco(fn: Callable[[StudyOptions], list[RunSpec]]) -> Callable[[StudyOptions], list[RunSpec]]:
        STUDIES[name] = Study(name, description, fn, None, in_all, all_epochs)
        return fn

    return deco


def reserve_study(name: str, description: str, message: str) -> None:
    """Register a name whose study is not available yet (``bnn-probe study NAME`` explains ``message``)."""
    STUDIES[name] = Study(name, description, None, message, in_all=False)


def study_names() -> list[str]:
    """Every registered study name, plus ``all``."""
    return [*STUDIES, "all"]


def get_study(name: str) -> Study:
    if name == "all":
        return Study("all", "a short version of every available study, one report", _build_all)
    if name not in STUDIES:
        raise BnnProbeError(f"unknown study {name!r}: choose one of {', '.join(study_names())}")
    st = STUDIES[name]
    if st.build is None:
        raise BnnProbeError(f"study {name!r} is not available yet: {st.reserved}")
    return st


def default_seeds(name: str) -> tuple[int, ...]:
    """Seeds of study ``name`` when ``--seeds`` is not given: studies whose verdicts need replication run three."""
    return INERTIA_SEEDS if name == "inertia" else (0,)


def parse_seeds(text: str | int | Sequence[int]) -> tuple[int, ...]:
    """``"0,1,2"`` → (0, 1, 2); an int n → (0, …, n−1) only when given as an int.

    >>> parse_seeds("3,4"), parse_seeds(2)
    ((3, 4), (0, 1))
    """
    if isinstance(text, int):
        if text < 1:
            raise BnnProbeError(f"--seeds needs at least one seed, got {text}")
        return tuple(range(text))
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    try:
        seeds = tuple(int(s) for s in items)
    except (TypeError, ValueError):
        raise BnnProbeError(f"--seeds must be comma-separated integers like 0,1,2; got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise BnnProbeError(f"--seeds must be distinct non-negative integers like 0,1,2; got {text!r}")
    return seeds


def _fmt(x: float) -> str:
    """Compact float for run names: 1e-3 → '1e-3', 0 → '0'."""
    if x == 0:
        return "0"
    m, e = f"{x:.0e}".split("e")
    return f"{m}e{int(e)}"


# ----------------------------------------------------------------------------------------------------------------------
# the studies

HYPER_GAMMAS = (1e-2, 1e-3, 1e-4)
HYPER_TAUS = (0.0, 1e-6, 1e-5)
THEOREM1_CS = (3.0, 10.0, 100.0)  # non-power-of-two scalings (Theorem 1 as an experiment)
THEOREM1_CS_QUICK = (100.0,)  # --quick and ``all``: the C whose clipping effect shows within a few epochs
THEOREM1_LR, THEOREM1_INIT = 1e-1, 1e-1
THEOREM1_ROUNDING = 1 + 2.0 ** -22  # rounding control: C = 1 + 2^-22, a scaling whose only effect is rounding
SNAPSHOT_EVERY = 5
INERTIA_SEEDS = (0, 1, 2)
TAU0_GAMMA = 2.0 ** -10


@register_study("hyperparams", "Bop γ ∈ {1e-2, 1e-3, 1e-4} at τ = 1e-6, τ ∈ {0, 1e-6, 1e-5} at γ = 1e-3 "
                "(paper Fig. 1)", all_epochs=6)
def _hyperparams(o: StudyOptions) -> list[RunSpec]:
    runs: list[RunSpec] = []
    for seed in o.seeds:
        base = o.base(seed, default_epochs=20, quick_epochs=2)
        grid = [(g, 1e-6) for g in HYPER_GAMMAS] + [(1e-3, t) for t in HYPER_TAUS if t != 1e-6]
        for gamma, tau in grid:
            cfg = replace(base, optimizer="bop", gamma=gamma, threshold=tau, tag="hyperparams")
            runs.append(RunSpec(f"bop-g{_fmt(gamma)}-t{_fmt(tau)}-s{seed}", cfg))
    return runs


@register_study("inertia", "the inertia interpretation: Theorem 1 with C ∈ {3, 10, 100} with and without clipping, "
                "Bop vs latent Adam from the same signs (flip hazard, flip overlap), latent SGD, the τ = 0 pair and "
                "the magnitude-reset pairs", all_epochs=6)
def _inertia(o: StudyOptions) -> list[RunSpec]:
    runs: list[RunSpec] = []
    for seed in o.seeds:
        base = replace(o.base(seed, default_epochs=20, quick_epochs=2), tag="inertia")
        runs += inertia_experiment_runs(base, seed, THEOREM1_CS_QUICK if o.quick else THEOREM1_CS)
        tau0 = replace(base, ste="identity", pair=f"tau0-s{seed}", tag="tau0", track=0)  # an exact check only
        runs.append(RunSpec(f"tau0-bop-s{seed}", replace(tau0, optimizer="bop", gamma=TAU0_GAMMA, threshold=0.0,
                                                        pair_role="a")))
        runs.append(RunSpec(f"tau0-latent-sgd-s{seed}", replace(
            tau0, optimizer="latent-sgd", lr=TAU0_GAMMA, decoupled_decay=1.0, momentum=0.0, clip=False,
            glorot_lr=False, init_scale=1e-20, pair_role="b")))
    runs += intervention_runs(o)  # magnitude-reset pairs; their latent arms also log the latent network
    return runs


RESET_ARMS = (("latent-adam", "constant"), ("latent-adam", "shuffle"), ("bop", "zero"))
RESET_ARMS_QUICK = (("latent-adam", "constant"), ("bop", "zero"))


def intervention_runs(o: StudyOptions, arms: Sequence[tuple[str, str]] | None = None) -> list[RunSpec]:
    """The magnitude-reset pairs (docs/reports.md): for every seed and (optimizer, mode) of ``arms`` (default
    :data:`RESET_ARMS`, with ``quick`` :data:`RESET_ARMS_QUICK`) a control and a reset run, identical until T = half
    of the run's optimizer steps; then the reset arm resets the inertia (:func:`bnn_probe.interventions.reset_inertia`).
    Latent Adam clips and logs its latent network each epoch (``latent_eval``); Bop uses γ = 1e-3, τ = 1e-6."""
    arms = arms if arms is not None else (RESET_ARMS_QUICK if o.quick else RESET_ARMS)
    runs: list[RunSpec] = []
    for seed in o.seeds:
        base = replace(o.base(seed, default_epochs=20, quick_epochs=2), tag="magnitude-reset")
        t = max(1, base.epochs * _data_for(base).steps_per_epoch(base.batch_size) // 2)
        for optimizer, mode in arms:
            cfg = replace(base, optimizer=optimizer, **({"gamma": 1e-3, "threshold": 1e-6} if optimizer == "bop"
                                                        else {"clip": True, "latent_eval": True}))
            pair = f"reset-{optimizer}-{mode}-s{seed}"
            for role in ("control", "reset"):
                iv = {"pair": pair, "role": role, "step": t, "mode": mode}
                runs.append(RunSpec(f"reset-{optimizer}-{mode}-{role}-s{seed}", replace(cfg, intervention=iv)))
    return runs


def inertia_experiment_runs(base: TrainConfig, seed: int, cs: Sequence[float] = THEOREM1_CS) -> list[RunSpec]:
    """One seed of the Theorem-1, hazard and Bop-vs-latent experiments (docs/reports.md, "The inertia
    interpretation"); ``base`` carries the dataset, model, epochs and seed.

    * Theorem 1: latent SGD (no momentum, Glorot lr factors, lr = 0.1, w̃_0 ~ U(−0.1, 0.1)) scaled by
      C ∈ ``cs`` (lr and w̃_0; default THEOREM1_CS), plus the C = 1 reference and a rounding control (C = 1 + 2^-22
      on both), in two arms: identity STE without clipping, clipped STE with clipping at 1. Sign hashes every step,
      snapshots every SNAPSHOT_EVERY steps; no tracked weights (these near-copies must not weigh on the hazard pools).
    * Bop (γ = 1e-3, τ = 1e-6) and latent Adam with clipping (Glorot init, the default ``latent_init``) from the same
      initial signs, snapshots every SNAPSHOT_EVERY steps: flip overlap, and with latent SGD the flip hazard.
    """
    runs: list[RunSpec] = []
    snap = replace(base, snapshot_every=SNAPSHOT_EVERY)
    runs.append(RunSpec(f"bop-s{seed}", replace(snap, optimizer="bop", gamma=1e-3, threshold=1e-6,
                                                extra={"bop_vs_latent": "bop"})))
    runs.append(RunSpec(f"latent-adam-clip-s{seed}", replace(snap, optimizer="latent-adam", clip=True,
                                                             extra={"bop_vs_latent": "latent"})))
    runs.append(RunSpec(f"latent-sgd-s{seed}", replace(base, optimizer="latent-sgd", clip=True)))
    for arm in ("unclipped", "clipped"):
        clip = arm == "clipped"
        t1 = replace(snap, optimizer="latent-sgd", ste="clipped" if clip else "identity", clip=clip, momentum=0.0,
                     glorot_lr=True, track=0, tag="theorem1-scaling")
        members = [(1.0, "reference"), (THEOREM1_ROUNDING, "rounding")] + [(c, "scaled") for c in cs]
        for c, role in members:
            name = {"reference": "c1", "rounding": "rounding"}.get(role, f"c{c:g}")
            runs.append(RunSpec(f"theorem1-{arm}-{name}-s{seed}", replace(
                t1, lr=THEOREM1_LR * c, init_scale=THEOREM1_INIT * c,
                extra={"theorem1": {"C": c, "arm": arm, "role": role}})))
    return runs


THRESHOLD_TAUS = (2e-7, 1e-6, 5e-6)
SWEEP_WIDTHS = (64, 256, 1024, 4096)
SWEEP_WIDTHS_QUICK = (32, 64, 128, 256)
SWEEP_MIN_SEEDS = 3  # the controlled width sweep runs at least this many seeds (extra seeds follow the given ones)
TAU_SWEEP_FACTORS = (0.1, 1 / 3, 3.0, 10.0)  # one layer's τ = factor × τ (factor 1: the shared base run)
TAU_SWEEP_FACTORS_QUICK = (0.1, 10.0)
TAU_SWEEP_TAG = "thresholds-tau-sweep"  # "-quick" appended for the quick grid


def _binary_layers(cfg: TrainConfig) -> list[tuple[str, int]]:
    """(parameter name, fan-in) of every binary layer of the config's model (built on the CPU, no data loaded)."""
    from .models import build_model
    from .nn import named_binary_parameters
    from .optim.thresholds import layer_fan_in

    image = cfg.model == "binarynet"
    in_shape = {"digits": (64,), "mnist1d": (40,), "cifar10": (3, 32, 32) if image else (3072,)}[cfg.dataset]
    model = build_model(cfg.model, in_shape=in_shape, num_classes=10, widths=cfg.widths,
                        width_multiplier=cfg.width_multiplier)
    return [(n, layer_fan_in(p)) for n, p in named_binary_parameters(model)]


def _sweep_seeds(seeds: Sequence[int], at_least: int = SWEEP_MIN_SEEDS) -> tuple[int, ...]:
    """The given seeds, extended by the next unused integers to ``at_least`` seeds.

    >>> _sweep_seeds((0,)), _sweep_seeds((5, 1)), _sweep_seeds((0, 1, 2, 3))
    ((0, 1, 2), (5, 1, 0), (0, 1, 2, 3))
    """
    out = list(seeds)
    nxt = 0
    while len(out) < at_least:
        if nxt not in out:
            out.append(nxt)
        nxt += 1
    return tuple(out)


def tau_sweep_runs(bop: TrainConfig, seeds: Sequence[int], quick: bool) -> list[RunSpec]:
    """The one-layer τ sweep: per seed, a base run (one τ) and, for each binary layer (quick: only the layers of
    largest and smallest fan-in) and factor f, a run whose layer has τ_l = f · τ and every other layer τ."""
    layers = _binary_layers(bop)
    if quick:
        by_fan = sorted(layers, key=lambda x: x[1])
        layers = [by_fan[-1], by_fan[0]] if len(by_fan) > 1 else by_fan
    factors = TAU_SWEEP_FACTORS_QUICK if quick else TAU_SWEEP_FACTORS
    tag = TAU_SWEEP_TAG + ("-quick" if quick else "")
    runs = []
    for seed in seeds:
        base = replace(bop, seed=seed, tag=tag)
        runs.append(RunSpec(f"tau-sweep-base-s{seed}", base))
        for name, _ in layers:
            short = name.removesuffix(".weight").replace(".", "_")
            for f in factors:
                runs.append(RunSpec(f"tau-sweep-{short}-x{f:.3g}-s{seed}", replace(
                    base, threshold_policy="one-layer", threshold_layer=name, threshold_layer_factor=f)))
    return runs


@register_study("thresholds", "per-layer thresholds (wide vs thin layers): Bop with global τ ×3, fan-in, calibrated, "
                "normalized (without and with flip feedback); Bop2ndOrder; latent Adam; no batch norm; a width sweep "
                "of MLP in → W → 256 → classes "
                "(≥ 3 seeds); the one-layer τ sweep", all_epochs=4)
def _thresholds(o: StudyOptions) -> list[RunSpec]:
    """docs/thresholds.md and docs/findings.md. MLP default widths become the wide/thin 2048, 64, 1024; γ = 1e-3,
    batch 64. The sweep varies fc2's fan-in W at fixed depth and fan-out (256), with at least 3 seeds. The one-layer
    τ sweep scales one layer's τ at a time by {1/10, 1/3, 3, 10} (quick: the widest and the thinnest layer by
    {1/10, 10})."""
    widths = (2048, 64, 1024) if o.model == "mlp" and tuple(o.widths) == (256, 256) else tuple(o.widths)
    runs: list[RunSpec] = []
    for seed in o.seeds:
        base = replace(o.base(seed, default_epochs=10, quick_epochs=2), widths=widths, gamma=1e-3, batch_size=64,
                       tag="thresholds")
        bop = replace(base, optimizer="bop", threshold=1e-6)
        for tau in THRESHOLD_TAUS:
            runs.append(RunSpec(f"global-t{_fmt(tau)}-s{seed}", replace(bop, threshold=tau)))
        runs.append(RunSpec(f"fan-in-s{seed}", replace(bop, threshold_policy="fan-in", fan_in_exponent=0.5)))
        runs.append(RunSpec(f"calibrated-s{seed}", replace(bop, threshold_policy="calibrated",
                                                           target_flip_ratio=1e-3)))
        runs.append(RunSpec(f"normalized-s{seed}", replace(bop, threshold_policy="normalized")))
        runs.append(RunSpec(f"normalized-balance-s{seed}", replace(bop, threshold_policy="normalized",
                                                                   threshold_balance=0.5, threshold_every=1)))
        runs.append(RunSpec(f"bop2nd-s{seed}", replace(base, optimizer="bop2nd", threshold=1e-3)))
        runs.append(RunSpec(f"latent-adam-s{seed}", replace(base, optimizer="latent-adam")))
        runs.append(RunSpec(f"no-bn-s{seed}", replace(bop, batch_norm=False, weight_scale="fan_in")))
    for seed in _sweep_seeds(o.seeds):
        bop = replace(o.base(seed, default_epochs=10, quick_epochs=2), widths=widths, gamma=1e-3, batch_size=64,
                      optimizer="bop", threshold=1e-6, tag="thresholds")
        for w in SWEEP_WIDTHS_QUICK if o.quick else SWEEP_WIDTHS:
            runs.append(RunSpec(f"sweep-w{w}-s{seed}", replace(bop, model="mlp", widths=(w, 256),
                                                               tag="thresholds-sweep")))
    bop0 = replace(o.base(o.seeds[0], default_epochs=10, quick_epochs=2), widths=widths, gamma=1e-3, batch_size=64,
                   optimizer="bop", threshold=1e-6)
    runs += tau_sweep_runs(bop0, o.seeds, o.quick)
    return runs


def _build_all(o: StudyOptions) -> list[RunSpec]:
    """Every available study in its short form: the study's ``all_epochs`` (2 with ``quick``) and its quick grid
    (e.g. the thresholds width sweep over small widths), so the main job fits in 3 minutes on 2 cores."""
    runs: list[RunSpec] = []
    for name, st in STUDIES.items():
        if st.build is None or not st.in_all:
            continue
        epochs = o.epochs if o.epochs is not None else (2 if o.quick else st.all_epochs)
        sub = st.build(replace(o, epochs=epochs, quick=True))
        runs.extend(RunSpec(f"{name}-{r.name}", r.config) for r in sub)
    return runs


def plan_study(name: str, options: StudyOptions) -> list[RunSpec]:
    """The runs of study ``name`` (validated: names unique, configs resolvable)."""
    specs = get_study(name).build(options)  # type: ignore[misc]
    seen: set[str] = set()
    out = []
    for s in specs:
        if s.name in seen:
            raise BnnProbeError(f"study {name!r} defines run {s.name!r} twice")
        seen.add(s.name)
        cfg = s.config
        if options.quick:
            cfg = replace(cfg, hist_every=0 if cfg.hist_every == 100 else cfg.hist_every)
        cfg.resolved()  # raises a one-line error for bad options
        out.append(RunSpec(s.name, cfg))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# running

_DATA_CACHE: dict[tuple, Any] = {}


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _data_for(cfg: TrainConfig):
    from .data import load_dataset

    key = (cfg.dataset, cfg.data_dir, cfg.model == "binarynet")
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_dataset(cfg.dataset, cfg.data_dir, layout="image" if key[2] else "flat")
    return _DATA_CACHE[key]


def _run_one(name: str, config: dict[str, Any], out: str, overwrite: bool, progress: bool) -> dict[str, Any]:
    """Train one run (in a worker process or in-process); returns a small JSON-able summary."""
    from .train import train

    cfg = TrainConfig.from_dict(config)
    t0 = time.perf_counter()
    # No checkpoints: an interrupted study run is retrained from scratch (it is short), not resumed.
    path = train(cfg, out, progress=progress, overwrite=overwrite, data=_data_for(cfg), checkpoint_every=0)
    return {"name": name, "path": str(path), "seconds": time.perf_counter() - t0, "reused": False}


# entries of ``config["extra"]`` that training itself records (derived from the other options, e.g. the per-layer τ
# of a threshold policy): a finished run's stored config has them, the planned config does not
_RECORDED_EXTRA = ("threshold_policy",)


def _comparable(config: Any) -> Any:
    """A run config without the entries training adds to ``extra``, to compare a stored run with a planned one."""
    if not isinstance(config, dict) or not isinstance(config.get("extra"), dict):
        return config
    extra = {k: v for k, v in config["extra"].items() if k not in _RECORDED_EXTRA}
    return {**config, "extra": extra}


def _existing(path: Path, config: TrainConfig) -> str:
    """'absent', 'same' (a finished run with this config), 'unfinished' (this config, not finished: a run of this
    study that was interrupted) or 'other'."""
    meta = path / "meta.json"
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return "absent"
    try:
        m = json.loads(meta.read_text())
    except (OSError, ValueError):
        return "other"
    stored, planned = _comparable(m.get("config")), _comparable(config.resolved().to_dict())
    if isinstance(stored, dict):  # an option added after the run was made, at its default: the run used it too
        defaults = TrainConfig().to_dict()
        planned = {k: v for k, v in planned.items() if k in stored or k not in defaults or v != defaults[k]}
    if stored != planned:
        return "other"
    return "same" if m.get("status") == "finished" else "unfinished"


def run_study(name: str, out: str | Path, options: StudyOptions = StudyOptions(), jobs: int = 1,
              progress: bool | None = None, overwrite: bool = False, report: bool = True,
              echo: Callable[[str], None] | None = None) -> Path:
    """Train every run of study ``name`` into ``out/<run>/`` and report them into ``out/report/``.

    A finished run already in ``out`` with the same options is reused and an unfinished one retrained (so an
    interrupted study resumes); another run in its place is an error unless ``overwrite``. With ``jobs > 1`` runs
    train in that many spawned processes, each with ``max(1, cpu_count // jobs)`` torch threads; ``jobs = 0``: one
    process per CPU core. With one job the runs train in this process (torch's thread setting). Returns the report's
    ``report.html`` (or ``out`` when
    ``report`` is False).
    """
    echo = echo or (lambda s: print(s, file=sys.stderr))
    if jobs < 0:
        raise BnnProbeError(f"--jobs must be a positive integer (0 = one per CPU core), got {jobs}")
    specs = plan_study(name, options)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if (out / "meta.json").is_file():
        raise FileExistsError(f"{out} is a run directory (it has a meta.json), not a study folder: choose another "
                              "--out")
    todo, results, redo = [], [], set()
    for s in specs:
        state = _existing(out / s.name, s.config)
        if state == "same" and not overwrite:
            results.append({"name": s.name, "path": str(out / s.name), "seconds": 0.0, "reused": True})
        elif state == "other" and not overwrite:
            raise FileExistsError(f"{out / s.name} holds another run; choose another --out or pass --overwrite")
        else:
            todo.append(s)
            if state != "absent":
                redo.add(s.name)
    out.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    if results:
        echo(f"reusing {len(results)} finished run(s) in {out}")
    if redo:
        echo(f"retraining {len(redo)} unfinished or replaced run(s)")
    jobs = jobs or (os.cpu_count() or 1)
    jobs = max(1, min(jobs, len(todo)))
    if jobs == 1:
        for s in todo:
            results.append(_run_one(s.name, s.config.to_dict(), str(out / s.name), s.name in redo, show))
    else:
        results.extend(_run_parallel(todo, out, jobs, redo, show))
    echo(f"trained {len(todo)} run(s) in {time.perf_counter() - t0:.1f} s")
    if not report:
        return out
    return _report(out, [out / s.name for s in specs], show, echo)


def _run_parallel(todo: list[RunSpec], out: Path, jobs: int, redo: set[str], show: bool) -> list[dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm.auto import tqdm

    threads = max(1, (os.cpu_count() or 1) // jobs)
    results = []
    bar = tqdm(total=len(todo), desc="runs", unit="run", disable=not show, leave=False)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(threads,)) as ex:
        futs = {ex.submit(_run_one, s.name, s.config.to_dict(), str(out / s.name), s.name in redo, False): s
                for s in todo}
        try:
            for f in as_completed(futs):
                results.append(f.result())
                bar.update(1)
                bar.set_postfix_str(futs[f].name, refresh=False)
        except BaseException:
            for f in futs:
                f.cancel()
            raise
        finally:
            bar.close()
    return results


def _report(out: Path, runs: list[Path], show: bool, echo: Callable[[str], None]) -> Path:
    try:
        from .reports import build_report
    except ImportError:
        echo(f"runs are in {out}; the report is not available in this version (bnn_probe.reports missing), "
             f"so no report was built")
        return out
    import warnings

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        try:
            path = build_report(runs, out / "report", progress=show)
        except BnnProbeError:
            raise
        except Exception as e:  # noqa: BLE001 - the runs are safe; say where the report failed in one line
            import traceback

            tb = traceback.extract_tb(e.__traceback__)[-1]
            where = f"{Path(tb.filename).name}:{tb.lineno}"
            raise BnnProbeError(f"the runs are in {out}, but building the report failed ({type(e).__name__}: {e} "
                                f"at {where}); retry with: bnn-probe report {out} --out {out / 'report'}") from e
    echo(f"report built in {time.perf_counter() - t0:.1f} s")
    return Path(path)


def summarize(out: str | Path, runs: Sequence[RunSpec]) -> list[dict[str, Any]]:
    """Final validation accuracy and mean flip ratio per run of a finished study (for tables)."""
    from .reports.training import accuracy_metric
    from .runlog import load_run

    rows = []
    for s in runs:
        r = load_run(Path(out) / s.name)
        tr, st = r.train, r.steps
        col = accuracy_metric(tr)  # val_accuracy, or another documented name (reports.training.HELD_OUT_ACCURACY)
        acc = tr[col].dropna() if col else []
        n_weights = int(r.layers["n_weights"].sum()) if len(r.layers) else 0
        n_steps = int(st["step"].nunique()) if len(st) else 0
        flips = float(st["flips"].sum()) / (n_steps * n_weights) if n_steps and n_weights else math.nan
        rows.append({"run": s.name, "val_accuracy": float(acc.iloc[-1]) if len(acc) else math.nan,
                     "flip_ratio": flips})
    return rows
