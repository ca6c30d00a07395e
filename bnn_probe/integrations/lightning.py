"""Lightning callback: ``ProbeCallback(logdir, **attach_options)`` attaches the probe to the Trainer's optimizer.

Install with ``pip install bnn-probe[lightning]``::

    from bnn_probe.integrations.lightning import ProbeCallback
    trainer = lightning.Trainer(callbacks=[ProbeCallback("runs/x", hist_every=50)])
    trainer.fit(module, datamodule)

Behaviour:

* **When**: the probe is attached at ``on_train_start`` (the start of fitting, after Lightning has built the
  optimizers and restored any checkpoint), to the optimizer that steps the binary weights: the only one, a
  :class:`~bnn_probe.optim.CaseOptimizer` holding them, or — with several optimizers — the one whose parameters
  contain every binary weight (``binary=`` picks them explicitly). Binary weights spread over several optimizers are
  refused with a one-line error (wrap them in one ``CaseOptimizer``).
* **Where it logs**: only to its own run directory ``logdir`` (Parquet + its own TensorBoard files under
  ``logdir/tb``). It never writes to, replaces or configures ``trainer.logger``; in the other direction, the scalar
  metrics the module logs with ``self.log`` (``trainer.callback_metrics``) are copied into the run's ``train``
  table at the end of every training epoch (``log_metrics=False`` turns that off).
* **Distributed**: the probe gets ``rank=trainer.global_rank``; only global rank 0 writes (see
  :mod:`bnn_probe.probe.distributed` for the cross-rank sign-hash check).
* **End**: ``on_fit_end`` closes the run as ``finished``; an exception in fit (``on_exception``, also Ctrl-C)
  closes it as ``failed``.
* **fit called again** (same callback object, same or a new Trainer): the *same run continues*. The run directory
  is reopened (``resume=True``), the probe's state (step counter, per-weight flip counters, running means) is
  restored from the end of the previous fit, so steps continue where they stopped and the status goes back to
  ``running`` until that fit ends. Lightning builds new optimizers for every fit; the probe hooks the new one.
* **Lightning checkpoints**: the callback's ``state_dict`` is the probe's state (flushed first, so the log holds
  every row up to the checkpoint); ``trainer.fit(..., ckpt_path=...)`` restores it and continues the run in
  ``logdir``. Rows the interrupted run wrote after that checkpoint are logged again and replace the old ones
  (:func:`bnn_probe.load_run` keeps the last row written per (step, layer)).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from ..errors import BnnProbeError

try:  # the unified package first, the standalone one otherwise
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as e:  # pragma: no cover
        raise ImportError("bnn_probe.integrations.lightning needs Lightning: pip install 'bnn-probe[lightning]'") \
            from e

__all__ = ["ProbeCallback", "select_optimizer"]


def select_optimizer(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                     binary: Any = None, **detect: Any) -> torch.optim.Optimizer:
    """The optimizer among ``optimizers`` that steps every binary parameter of ``module`` (``binary=`` and
    ``detect`` = ``family``, ``momentum_key``, ``threshold_key``, ``gamma_key`` as in :func:`bnn_probe.attach`);
    :class:`~bnn_probe.errors.BnnProbeError` when none does."""
    from ..probe.binary_detect import resolve_layers

    if not optimizers:
        raise BnnProbeError("ProbeCallback: the Trainer has no optimizer (configure_optimizers returned none)")
    errors = []
    for opt in optimizers:
        try:
            resolve_layers(module, opt, binary, **detect)
            return opt
        except BnnProbeError as e:
            errors.append(str(e))
    if len(optimizers) == 1:
        raise BnnProbeError(f"ProbeCallback: {errors[0]}")
    raise BnnProbeError(
        f"ProbeCallback: none of the Trainer's {len(optimizers)} optimizers steps every binary weight; combine them in "
        "one bnn_probe.optim.CaseOptimizer, or pass binary=[names] for the weights of one optimizer")


def _scalar(v: Any) -> float | None:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = v.detach().float().item()
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(float(v)) else None


class ProbeCallback(pl.Callback):
    """Attach :func:`bnn_probe.attach` to a Lightning Trainer's optimizer (see the module docstring).

    Args:
        logdir: the run directory (created; a directory that already holds a run is refused unless this callback
            is restoring it from a Lightning checkpoint).
        log_metrics: copy ``trainer.callback_metrics`` scalars into the run's ``train`` table every epoch.
        attach_options: any :func:`bnn_probe.attach` option (``every``, ``hist_every``, ``binary``, ``tag`` …).
            ``config`` defaults to the Trainer's settings and the module's ``hparams``.

    Attributes:
        probe: the live :class:`~bnn_probe.probe.Probe` (None before the first fit).
    """

    def __init__(self, logdir: str | os.PathLike, log_metrics: bool = True, **attach_options: Any) -> None:
        super().__init__()
        self.logdir = os.fspath(logdir)
        self.log_metrics = bool(log_metrics)
        self.attach_options = dict(attach_options)
        self.probe: Any = None
        self._state: dict[str, Any] | None = None  # probe state to continue from (previous fit or checkpoint)
        self.fits = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(logdir=self.logdir)

    # ------------------------------------------------------------------ lifecycle
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        import bnn_probe

        if self.probe is not None and not self.probe._closed:  # pragma: no cover - fit never ends without a hook
            self._close("finished")
        opts = dict(self.attach_options)
        opt = select_optimizer(pl_module, list(trainer.optimizers), opts.get("binary"),
                               **{k: opts[k] for k in ("family", "momentum_key", "threshold_key", "gamma_key")
                                  if k in opts})
        opts.setdefault("rank", trainer.global_rank)
        opts.setdefault("config", self._config(trainer, pl_module))
        resume = self._state is not None
        opts["resume"] = resume or bool(opts.get("resume", False))
        self.probe = bnn_probe.attach(pl_module, opt, self.logdir, **opts)
        if resume:
            self.probe.load_state_dict(self._state)
        self.fits += 1

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.log_metrics or self.probe is None or self.probe._closed or trainer.sanity_checking:
            return
        scalars = {k: s for k, v in trainer.callback_metrics.items() if (s := _scalar(v)) is not None}
        if scalars:
            self.probe.log(epoch=trainer.current_epoch, **scalars)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close("finished")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close("failed")

    def _close(self, status: str) -> None:
        if self.probe is None or self.probe._closed:
            return
        self._state = self.probe.state_dict()
        self.probe.close(status)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.probe is not None and not self.probe._closed:
            self.probe.flush()  # every row up to this checkpoint is on disk before the checkpoint exists
            return {"probe": self.probe.state_dict(), "logdir": self.logdir}
        return {"probe": self._state, "logdir": self.logdir} if self._state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probe") is not None:
            self._state = state_dict["probe"]

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _config(trainer: Any, pl_module: Any) -> dict[str, Any]:
        hp = getattr(pl_module, "hparams", None) or {}
        cfg: dict[str, Any] = {
            "framework": "lightning", "lightning_version": pl.__version__,
            "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
            "precision": str(getattr(trainer, "precision", "")), "world_size": trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
        }
        cfg["hparams"] = {k: (v if isinstance(v, bool | int | float | str) or v is None else repr(v))
                          for k, v in dict(hp).items()}
        return cfg
