"""``bnn-probe train``: one reference run with the probe attached (the options are :class:`TrainConfig`'s fields)."""

from __future__ import annotations

import math

import click

from ..errors import BnnProbeError

_AUTO = "auto per optimizer, see docs/training.md"


def _choice_help(text: str, choices: tuple[str, ...]) -> str:
    return f"{text} One of: {', '.join(choices)}."


# Choices are validated by TrainConfig (one-line error, exit 2) rather than click.Choice (a usage block).
MODELS = ("mlp", "binarynet", "cnn1d")
DATASETS = ("digits", "mnist1d", "cifar10")
OPTIMIZERS = ("bop", "bop2nd", "latent-adam", "latent-sgd")


def train_options(f):
    """The run options shared by ``train`` (decorator)."""
    opts = [
        click.option("--model", default="mlp", show_default=True, metavar="[mlp|binarynet|cnn1d]",
                     help=_choice_help("Reference model.", MODELS)),
        click.option("--widths", default="256,256", show_default=True,
                     help="MLP hidden widths, comma-separated (e.g. 2048,64,1024)."),
        click.option("--width-multiplier", type=float, default=1.0, show_default=True,
                     help="BinaryNet channel/unit multiplier (1 = the paper's 14M binary weights; 0.125 for CPU)."),
        click.option("--batch-norm/--no-batch-norm", default=True, show_default=True,
                     help="Batch norm after every binary layer."),
        click.option("--weight-scale", default="none", show_default=True, metavar="[none|mean|fan_in]",
                     help="Binary weight scaling (use mean or fan_in with --no-batch-norm)."),
        click.option("--dataset", default="digits", show_default=True, metavar="[digits|mnist1d|cifar10]",
                     help=_choice_help("Dataset (digits and mnist1d need no download).", DATASETS)),
        click.option("--data-dir", default=None, type=click.Path(path_type=str),
                     help="CIFAR-10 python-version folder (data_batch_1..5, test_batch)."),
        click.option("--optimizer", default="bop", show_default=True,
                     metavar="[bop|bop2nd|latent-adam|latent-sgd]",
                     help=_choice_help("Optimizer of the binary weights.", OPTIMIZERS)),
        click.option("--gamma", type=float, default=None, help="Bop adaptivity rate γ [default: 1e-4, the paper's]."),
        click.option("--threshold", type=float, default=None, help="Bop threshold τ [default: 1e-8, the paper's]."),
        click.option("--threshold-policy", default="global", show_default=True,
                     type=click.Choice(["global", "fan-in", "calibrated", "from-report", "normalized",
                                        "one-layer"]),
                     help="Per-layer Bop τ (docs/thresholds.md): one τ; τ·(n_ref/fan_in)^a; an online controller "
                          "holding each layer's flip ratio; a report's recommended τ; k times an online average of "
                          "the layer's mean |m| (--threshold is then the τ of the first step only); τ for every layer "
                          "but --threshold-layer, which gets --threshold-layer-factor × τ."),
        click.option("--fan-in-exponent", type=float, default=0.5, show_default=True,
                     help="fan-in policy: exponent a (n_ref = geometric mean of the model's fan-ins)."),
        click.option("--target-flip-ratio", type=float, default=None,
                     help="calibrated policy: flip ratio per step each layer is held at (e.g. 1e-3)."),
        click.option("--threshold-multiple", type=float, default=None,
                     help="normalized policy: k in τ_l = k · mean|m| of layer l (EMA over steps) [default: 2]."),
        click.option("--threshold-scale", type=click.Choice(["mean_abs", "rms", "flow"]), default=None,
                     help="normalized policy: the layer's scale s_l — mean_abs (EMA of mean |m|), rms (of m) or flow "
                          "(k·mean |m| less the overshoot of Bop's step; Bop only; docs/thresholds.md) "
                          "[default: mean_abs]."),
        click.option("--threshold-balance", type=float, default=None,
                     help="normalized policy: gain κ of the allocation feedback from counted flips (τ_l = k·c_l·s_l, "
                          "c_l steered towards equal flip ratios across layers; docs/thresholds.md) [default: 0, "
                          "off]."),
        click.option("--threshold-every", type=int, default=None,
                     help="calibrated and normalized policies: steps between the controller's updates of τ (one "
                          "host copy each) [default: 10]."),
        click.option("--threshold-layer", default=None,
                     help="one-layer policy: the binary layer (e.g. fc2) whose τ is scaled."),
        click.option("--threshold-layer-factor", type=float, default=1.0, show_default=True,
                     help="one-layer policy: that layer's τ = factor × --threshold."),
        click.option("--thresholds-csv", default=None, type=click.Path(path_type=str),
                     help="from-report policy: a report's tables/thresholds.csv (or report folder); PATH#RUN "
                          "picks one run of a multi-run report."),
        click.option("--sigma", type=float, default=None, help="Bop2ndOrder second-moment rate σ [default: 1e-4]."),
        click.option("--lr", type=float, default=None,
                     help="Latent-weight learning rate [default: latent-adam 1e-3 (paper), latent-sgd 0.1], "
                          "multiplied per layer by BinaryNet's Glorot factor unless --no-glorot-lr."),
        click.option("--lr-real", type=float, default=1e-2, show_default=True,
                     help="Adam learning rate of the real-valued parameters (batch norm, biases)."),
        click.option("--decay-every", type=int, default=0, show_default=True,
                     help="Multiply γ, lr and lr-real by --decay-factor every N epochs (0 = constant; "
                          "paper: 100 of 500)."),
        click.option("--decay-factor", type=float, default=0.1, show_default=True, help="Step-decay factor."),
        click.option("--clip/--no-clip", default=None,
                     help="Latent optimizers: clip latent weights to [-1, 1] after every step [default: clip]."),
        click.option("--ste", default="clipped", show_default=True, metavar="[clipped|identity]",
                     help="Weight straight-through estimator: clipped (1[|w|<=1]) or identity."),
        click.option("--init-scale", type=float, default=None,
                     help="Latent optimizers: initial |w| ~ U(0, s] [default: the bound of --latent-init]. Signs are "
                          "the same ±1 draw Bop starts from."),
        click.option("--latent-init", type=click.Choice(["glorot", "uniform1"]), default="glorot", show_default=True,
                     help="Latent optimizers: initial |w| bound s (w ~ U(-s, s)): glorot = sqrt(6/(fan_in+fan_out)) "
                          "per layer; uniform1 = 1, BinaryNet's U(-1, 1). --init-scale overrides it."),
        click.option("--glorot-lr/--no-glorot-lr", default=None,
                     help="Latent optimizers: BinaryNet per-layer lr factor 1/sqrt(1.5/(fan_in+fan_out)) "
                          "[default: on]."),
        click.option("--momentum", type=float, default=None, help="latent-sgd momentum [default: 0]."),
        click.option("--decoupled-decay", type=float, default=None,
                     help="latent-sgd decoupled decay d: w <- (1 - lr*d) w before each step [default: 0]. "
                          "d = 1 with lr = γ is Bop at τ = 0."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True,
                     help="L2 weight decay of the real-valued parameters (and of latent weights for latent "
                          "optimizers)."),
        click.option("--epochs", type=int, default=20, show_default=True, help="Training epochs."),
        click.option("--batch-size", type=int, default=50, show_default=True, help="Batch size (paper: 50)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the model, the initial signs and the batch order."),
        click.option("--device", default="cpu", show_default=True, help="torch device (cpu, cuda, cuda:1, ...)."),
        click.option("--threads", type=int, default=None,
                     help="torch CPU threads [default: torch's choice]. 1 is fastest for small models on a busy "
                          "machine. Recorded (config and checkpoint) and restored by --resume; given with --resume "
                          "it overrides the recorded count."),
        click.option("--probe-every", type=int, default=1, show_default=True,
                     help="Probe: log the per-layer steps table every N steps (0 = never: reports then lack flip "
                          "ratios)."),
        click.option("--hist-every", type=int, default=100, show_default=True,
                     help="Probe: histograms every N steps (0 = never)."),
        click.option("--snapshot-every", type=int, default=1000, show_default=True,
                     help="Probe: packed sign snapshots every N steps (0 = never)."),
        click.option("--track", type=int, default=64, show_default=True,
                     help="Probe: weights tracked per layer (inertia and sign over time)."),
        click.option("--quantile-every", type=int, default=10, show_default=True,
                     help="Probe: the steps table's quantile columns (|m|, w·m, margin, |w̃| quantiles of the "
                          "sample) on the logged steps that are multiples of N, NaN on the others (one sort per step "
                          "that has them; 1 = every "
                          "logged step, 0 = never)."),
        click.option("--tag", default=None, help="Free text stored in the run's metadata."),
        click.option("--pair", default=None, help="Pair name for paired runs (report: theorem1*/tau0* pairs)."),
        click.option("--pair-role", default=None, metavar="[a|b]", help="This run's role in --pair."),
        click.option("--reset-inertia-step", type=int, default=None,
                     help="Magnitude-reset experiment: after optimizer step T reset the inertia of every binary "
                          "weight, signs kept (bnn_probe.interventions.reset_inertia); with --intervention-role "
                          "control only mark step T. Run both arms with the same seed."),
        click.option("--reset-inertia-mode", default=None, metavar="[constant|shuffle|zero]",
                     help="Latent: |w̃| ← layer mean (constant) or permuted in the layer (shuffle). Bop: m ← 0 "
                          "(zero), |m| ← layer mean or permuted, sign of m kept [default: constant]."),
        click.option("--intervention-pair", default=None,
                     help="Name shared by the control and reset arms [default: "
                          "<dataset>-<model>-<optimizer>-<mode>-T<step>-s<seed>]."),
        click.option("--intervention-role", default=None, metavar="[control|reset]",
                     help="This run's arm of the magnitude-reset pair (needs --reset-inertia-step) [default: reset]."),
        click.option("--latent-eval/--no-latent-eval", default=None,
                     help="Latent optimizers: every epoch, evaluate the latent network (w̃/mean|w̃| in place of "
                          "sign w̃) and log the per-layer approximation error [default: off; on in the inertia "
                          "study's magnitude-reset runs]."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def config_from_options(opts: dict) -> object:
    """Build a :class:`bnn_probe.train.TrainConfig` from the click options (validation happens at resolve)."""
    from ..train import TrainConfig, parse_widths

    widths = parse_widths(opts["widths"]) if opts["model"] == "mlp" else ()
    return TrainConfig(
        model=opts["model"], widths=widths, width_multiplier=opts["width_multiplier"],
        batch_norm=opts["batch_norm"], weight_scale=opts["weight_scale"], dataset=opts["dataset"],
        data_dir=opts["data_dir"], optimizer=opts["optimizer"], gamma=opts["gamma"], threshold=opts["threshold"],
        threshold_policy=opts["threshold_policy"], fan_in_exponent=opts["fan_in_exponent"],
        target_flip_ratio=opts["target_flip_ratio"], thresholds_csv=opts["thresholds_csv"],
        threshold_multiple=opts["threshold_multiple"], threshold_scale=opts["threshold_scale"],
        threshold_balance=opts["threshold_balance"], threshold_every=opts["threshold_every"],
        threshold_layer=opts["threshold_layer"],
        threshold_layer_factor=opts["threshold_layer_factor"],
        sigma=opts["sigma"], lr=opts["lr"], lr_real=opts["lr_real"], decay_every=opts["decay_every"],
        decay_factor=opts["decay_factor"], clip=opts["clip"], ste=opts["ste"], init_scale=opts["init_scale"],
        latent_init=opts["latent_init"],
        glorot_lr=opts["glorot_lr"], momentum=opts["momentum"], decoupled_decay=opts["decoupled_decay"],
        weight_decay=opts["weight_decay"], epochs=opts["epochs"], batch_size=opts["batch_size"], seed=opts["seed"],
        device=opts["device"], probe_every=opts["probe_every"], hist_every=opts["hist_every"],
        snapshot_every=opts["snapshot_every"], track=opts["track"], quantile_every=opts["quantile_every"],
        tag=opts["tag"], pair=opts["pair"],
        pair_role=opts["pair_role"], intervention=_intervention(opts), latent_eval=opts["latent_eval"],
    )


def _intervention(opts: dict) -> dict | None:
    """The run config's ``intervention`` entry from the --reset-inertia-* options (None without a step)."""
    step = opts["reset_inertia_step"]
    if step is None:
        given = [f"--{k.replace('_', '-')}" for k in ("reset_inertia_mode", "intervention_pair", "intervention_role")
                 if opts[k] is not None]
        if given:
            raise BnnProbeError(f"{', '.join(given)} need(s) --reset-inertia-step T (the step of the reset)")
        return None
    mode = opts["reset_inertia_mode"] or "constant"
    pair = opts["intervention_pair"] or f"{opts['dataset']}-{opts['model']}-{opts['optimizer']}-{mode}-T{step}-" \
                                        f"s{opts['seed']}"
    return {"pair": pair, "role": opts["intervention_role"] or "reset", "step": step, "mode": mode}


@click.command("train")
@train_options
@click.option("--out", default=None, type=click.Path(path_type=str),
              help="Run directory [default: runs/<dataset>-<model>-<optimizer>-s<seed>]. Never overwritten "
                   "silently.")
@click.option("--overwrite", is_flag=True,
              help="Replace a previous bnn-probe run in --out: only the files bnn-probe wrote are deleted (others are "
                   "kept), and only once the new run's data and model are ready; links are refused.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar [default: only when stderr is a terminal].")
@click.option("--amp", default="none", show_default=True, type=click.Choice(["none", "bf16", "fp16"]),
              help="Mixed-precision forward (autocast); binary weights and optimizer state stay fp32. fp16 adds a "
                   "GradScaler and is meant for CUDA (on the CPU it runs, slowly); bf16 works on both.")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--checkpoint-every", type=int, default=1, show_default=True,
              help="Write <out>/checkpoint.pt every N epochs (0 = never), for --resume.")
@click.option("--resume", default=None, type=click.Path(path_type=str, file_okay=False),
              help="Continue the run in this directory from its last checkpoint, with the options it was started "
                   "with (other run options are ignored). Under torchrun too (docs/distributed.md).")
def train(out, overwrite, progress, threads, amp, compile_, checkpoint_every, resume, **opts):
    """Train one reference model with the probe attached; log per-layer flips, momentum/inertia and the
    train/validation loss and accuracy into a run directory.

    Runs unchanged under ``torchrun --nproc-per-node N``: --batch-size is then the global batch."""
    from dataclasses import replace

    import torch

    from ..probe.distributed import is_rank_zero
    from ..train import resume_training
    from ..train import train as run_train

    if threads is not None and not 1 <= threads <= 4096:
        raise BnnProbeError(f"--threads must be a positive integer (at most 4096), got {threads}")
    if not 0 <= checkpoint_every < 2**31:
        raise BnnProbeError(f"--checkpoint-every must be a non-negative number of epochs, got {checkpoint_every}")
    if resume is not None:
        path = resume_training(resume, progress=progress, checkpoint_every=checkpoint_every, threads=threads)
    else:
        config = replace(config_from_options(opts), amp=amp, compile=compile_, threads=threads).resolved()
        if out is None:
            out = f"runs/{config.dataset}-{config.model}-{config.optimizer}-s{config.seed}"
        path = run_train(config, out, progress=progress, overwrite=overwrite, checkpoint_every=checkpoint_every)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # the run's DDP wrapper (its reducer holds gloo work) is collected while the group still exists, and every
        # rank is done with its collectives before any tears the group down: a rank was seen to abort at exit
        # ("terminate called without an active exception") once its peer had destroyed gloo's connections first
        import gc

        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if is_rank_zero():
        _print_result(path)


def _print_result(path) -> None:
    from ..runlog import load_run

    try:
        tr = load_run(path).train
        acc = tr["val_accuracy"].dropna() if "val_accuracy" in tr else []
        last = float(acc.iloc[-1]) if len(acc) else math.nan
    except Exception:  # noqa: BLE001 - the summary line is a courtesy
        last = math.nan
    suffix = "" if math.isnan(last) else f" (final validation accuracy {100 * last:.1f} %)"
    click.echo(f"{path}{suffix}")
