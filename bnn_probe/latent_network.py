"""The latent network of a latent-weight BNN, and how well α·sign(w̃) approximates w̃.

The "approximation" view of latent-weight training holds that the real-valued latent weights w̃ are the model and
the binary network sign(w̃) approximates it; Helwegen et al. (2019, Sec. 3) argue that w̃ is no weight at all
(its magnitude is inertia). Two measurements tell the views apart:

* **Approximation error** per binary layer l, with the least-squares scale
  α_l = argmin_α ‖w̃_l − α·sign(w̃_l)‖² = mean|w̃_l| (XNOR-Net's scale, Rastegari et al. 2016):

      approx_error_l = ‖w̃_l − α_l·sign(w̃_l)‖ / ‖w̃_l‖ = sqrt(1 − mean(|w̃_l|)² / mean(w̃_l²))

  0 when every |w̃| is equal (w̃ is exactly a scaled binary tensor), larger the more the magnitudes spread.
* **The latent network**: the same model with every binary weight sign(w̃_l) replaced by w̃_l/α_l (the real-valued
  tensor that α_l·sign(w̃_l) approximates, put on the ±1 scale of the binary weights). Activations stay binary and
  per-layer weight scales (``weight_scale``) apply as before. Batch-norm statistics collected with ±1 weights do not
  fit real-valued weights, so the latent network's batch-norm running statistics are re-estimated (cumulative mean
  over at most :data:`RECALIBRATE_SAMPLES` training samples, in data order) on a copy of the model before it is
  evaluated on the validation set; the binary network keeps its own running statistics. This favours the latent
  network, so a latent network that is still less accurate is evidence against the approximation view.

The Bop family has no latent network: its state m is an exponential moving average of gradients, not a weight the
binary one approximates (Helwegen et al. 2019), so nothing here applies to it.

:func:`latent_network_metrics` returns the train-table entries the runner logs every epoch for latent-weight runs
with ``latent_eval`` (``--latent-eval``):
``latent_val_loss``, ``latent_val_accuracy`` and ``approx_error/<layer>`` (docs/runlog-format.md).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["RECALIBRATE_SAMPLES", "approximation_error", "latent_scale", "latent_weights", "latent_network_metrics"]

RECALIBRATE_SAMPLES = 10_000


def latent_scale(w: Tensor) -> float:
    """α = mean|w̃|, the least-squares scale of α·sign(w̃) ≈ w̃."""
    return float(w.detach().abs().double().mean())


def approximation_error(w: Tensor) -> float:
    """‖w̃ − α·sign(w̃)‖ / ‖w̃‖ with α = mean|w̃| (NaN for an all-zero tensor).

    >>> approximation_error(torch.tensor([1.0, -1.0, 1.0]))
    0.0
    >>> round(approximation_error(torch.tensor([3.0, -1.0])), 6)  # α = 2: ‖(1, 1)‖ / ‖(3, −1)‖ = sqrt(2/10)
    0.447214
    """
    x = w.detach().double().reshape(-1)
    norm = float(x.norm())
    if norm == 0:
        return math.nan
    alpha = float(x.abs().mean())
    s = torch.where(x >= 0, 1.0, -1.0).double()
    return float((x - alpha * s).norm()) / norm


@contextmanager
def latent_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every binary layer of ``model`` computes with w̃/α in place of sign(w̃) (forward only).

    The layer's own scaling applies unchanged: its binary weight b = c·sign(w̃) (c: the layer's weight scale) is
    replaced by b·sign(w̃)·w̃/α = c·w̃/α, exactly, since sign(w̃)² = 1.
    """
    from .nn import BinaryModule, sign

    patched = []
    for m in model.modules():
        if isinstance(m, BinaryModule):
            alpha = latent_scale(m.weight)
            orig = m.binary_weight

            def latent(orig=orig, m=m, alpha=alpha) -> Tensor:
                w = m.weight.detach()
                return orig().detach() * sign(w) * (w / alpha if alpha > 0 else w)

            m.binary_weight = latent  # type: ignore[method-assign]
            patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.binary_weight


@torch.no_grad()
def _recalibrate_bn(model: nn.Module, x: Tensor, batch_size: int) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
    model.train()
    for i in range(0, len(x), batch_size):
        if len(x[i:i + batch_size]) >= 2:
            model(x[i:i + batch_size])
    model.eval()


@torch.no_grad()
def latent_network_metrics(model: nn.Module, data, batch_size: int = 1000) -> dict[str, float]:
    """``latent_val_loss``, ``latent_val_accuracy`` (the latent network on the validation set, batch-norm statistics
    re-estimated on the training set) and ``approx_error/<layer>`` for every binary layer of ``model``."""
    from .nn import named_binary_parameters
    from .train import evaluate

    out = {f"approx_error/{name}": approximation_error(p) for name, p in named_binary_parameters(model)}
    twin = copy.deepcopy(model)
    with latent_weights(twin):
        _recalibrate_bn(twin, data.x_train[:RECALIBRATE_SAMPLES], batch_size)
        loss, acc = evaluate(twin, data.x_val, data.y_val, batch_size)
    out["latent_val_loss"] = loss
    out["latent_val_accuracy"] = acc
    return out
