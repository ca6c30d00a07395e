"""Scale helpers for training loops: torchrun/DDP set-up, global-batch sharding, synchronised batch norm (also on
CPU/gloo), mixed-precision autocast and ``torch.compile``. docs/distributed.md shows them at work.

The conventions ``bnn-probe train`` follows under ``torchrun --nproc-per-node N``:

* ``--batch-size`` is the **global** batch. Every rank draws the same permutation (same seed) and takes its shard of
  each global batch (:func:`shard`, contiguous ``tensor_split``), so N ranks see exactly the samples one process
  would see at each step.
* The loss of a shard is ``Σ_shard loss_i · N / B`` (:func:`global_mean_loss`): after DDP averages the gradients over
  the N ranks, the gradient is that of the mean loss over the global batch B, also when B is not a multiple of N.
* Batch norm is synchronised (:func:`sync_batchnorm`): torch's ``SyncBatchNorm`` on CUDA and :class:`SyncBatchNormCPU`
  on CPU (gloo), so the batch statistics are those of the global batch. With both, a run on N processes computes
  the same steps as a one-process run with the same global batch, up to floating-point rounding.

Example:
    >>> import torch
    >>> x, y = torch.arange(10.).reshape(5, 2), torch.arange(5)
    >>> shard(x, y, rank=1, world=2)[1].tolist()
    [3, 4]
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DistInfo", "init_distributed", "shard", "global_mean_loss", "SyncBatchNormCPU", "sync_batchnorm", "wrap_ddp",
    "AMP_MODES", "autocast", "grad_scaler", "compile_model", "unwrap", "Runtime",
]

AMP_MODES: tuple[str, ...] = ("none", "bf16", "fp16")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank``, ``world`` size, ``local_rank``, and the ``device`` it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu", backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``).

    Without torchrun (``WORLD_SIZE`` unset or 1) nothing happens and ``DistInfo(device=device)`` comes back. On CUDA
    each process takes ``cuda:LOCAL_RANK`` and the backend is NCCL; on CPU it is gloo. A process group that is already
    initialised is reused.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return DistInfo(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, str(dev))


def shard(x: Tensor, y: Tensor, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """This rank's contiguous part of a global batch (``torch.tensor_split``: sizes differ by at most one)."""
    if world <= 1:
        return x, y
    return torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]


def global_mean_loss(out: Tensor, y: Tensor, global_batch: int, world: int) -> Tensor:
    """Cross-entropy of a shard scaled so that DDP's gradient average equals the global-batch mean's gradient:
    ``Σ_shard CE_i · world / global_batch`` (equals ``F.cross_entropy(out, y)`` in a one-process run)."""
    if world <= 1:
        return F.cross_entropy(out, y)
    return F.cross_entropy(out, y, reduction="sum") * (world / global_batch)


def all_reduce(x: Tensor) -> Tensor:
    """Differentiable sum over ranks (its backward sums the gradients over ranks)."""
    import warnings

    from torch.distributed.nn.functional import all_reduce as _all_reduce

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "deprecated": the replacement is not differentiable
        return _all_reduce(x)


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch across ``torch.distributed`` ranks, on any
    device and backend (torch's ``SyncBatchNorm`` refuses CPU tensors, so gloo runs need this one).

    Two differentiable ``all_reduce``\\ s per call: Σx and the count, then Σ(x − μ)² (two-pass variance, like the
    one-process kernel). Running statistics use the unbiased global variance. Outside training, or when not
    distributed, it is an ordinary ``BatchNorm``.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {x.dim()}-D)")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        dist = torch.distributed
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), float(x.numel() // max(1, x.shape[1])), dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        xc = x - mean.view(shape)
        var = all_reduce((xc * xc).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n / (n - 1)).clamp_min(0)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Replace every ``BatchNorm*d`` of ``model`` by a synchronised one (parameters and buffers carried over):
    torch's ``SyncBatchNorm`` for CUDA, :class:`SyncBatchNormCPU` otherwise."""
    if torch.device(device).type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNormCPU):
        out = SyncBatchNormCPU(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed (CUDA: ``device_ids=[local_rank]``), else ``model``.

    Attach the probe to the unwrapped model (:func:`unwrap`) so layer names carry no ``module.`` prefix."""
    if not info.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = torch.device(info.device)
    if dev.type == "cuda":
        return DDP(model, device_ids=[dev.index])
    return DDP(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP and/or ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def autocast(device: str | torch.device, amp: str = "none") -> contextlib.AbstractContextManager:
    """Mixed-precision forward: ``amp`` = ``"none"`` (nothing: a ``nullcontext``, the runner enters it every step),
    ``"bf16"`` or ``"fp16"`` (``torch.autocast`` on the device's type). Parameters, gradients and optimizer state
    (Bop's m) stay float32: autocast only casts the operands of matmuls/convolutions inside the region. fp16 needs
    :func:`grad_scaler` (and CUDA)."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def grad_scaler(device: str | torch.device, amp: str) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for fp16 (it unscales gradients before the optimizer step, so Bop's m sees the true
    gradient; a step with inf/NaN gradients is skipped and the probe then records nothing for it); None otherwise."""
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def compile_model(model: nn.Module, enabled: bool = True, **options) -> nn.Module:
    """``torch.compile(model, **options)`` when ``enabled``. The probe's hooks sit on the optimizer, so it works the
    same with a compiled model; attach it to the uncompiled module (:func:`unwrap`) for clean layer names."""
    return torch.compile(model, **options) if enabled else model


class Runtime:
    """How a training loop runs one step: sharding, DDP, autocast, GradScaler, torch.compile (the runner's seam).

    ``step(model, optimizer, x, y)`` takes a *global* batch and returns ``(out, y_shard, loss)``: this rank's shard
    goes through ``forward`` (DDP- and/or compile-wrapped ``model``) under ``autocast``, the loss is
    :func:`global_mean_loss`, backward (scaled for fp16), then the optimizer steps (``scaler.step`` for fp16).
    With one process, no AMP and no compile it is exactly ``F.cross_entropy(model(x), y)``, backward, step.
    """

    def __init__(self, model: nn.Module, info: DistInfo, amp: str = "none", compile: bool = False) -> None:
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
        self.info, self.amp = info, amp
        self.forward = compile_model(wrap_ddp(model, info), compile)
        self.scaler = grad_scaler(info.device, amp)

    def step(self, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        info = self.info
        xs, ys = shard(x, y, info.rank, info.world)
        with autocast(info.device, self.amp):
            out = self.forward(xs)
            loss = global_mean_loss(out, ys, len(y), info.world)
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return out, ys, loss

    def reduce_epoch(self, losses: Tensor, correct: Tensor, seen: int) -> tuple[Tensor, Tensor, int]:
        """Global per-step mean losses and accuracy counts of an epoch (one ``all_reduce`` per epoch): each rank's
        loss is ``Σ_shard CE · N / B``, so the sum over ranks divided by N is the global-batch mean."""
        if not self.info.distributed:
            return losses, correct, seen
        buf = torch.cat([losses.double().reshape(-1), correct.double().reshape(1),
                         torch.tensor([float(seen)], dtype=torch.float64, device=losses.device)])
        if torch.distributed.get_backend() == "gloo":
            buf = buf.cpu()
        torch.distributed.all_reduce(buf)
        n = losses.numel()
        return (buf[:n] / self.info.world).to(losses.device), buf[n].round().long(), int(buf[n + 1].item())
