"""Reference binary models: an MLP of chosen widths, BinaryNet (CIFAR-10) and a 1-D conv net for MNIST-1D.

All follow BinaryNet's conventions (Courbariaux & Hubara et al. 2016):

* the first layer has binary weights but sees the real-valued input (no sign on the input);
* every binary layer is followed by batch norm (``batch_norm=False`` drops it for Bop without batch norm; use it with
  ``scale="fan_in"`` or ``"mean"`` so the pre-activations keep a sensible scale);
* hidden activations are binary (sign forward, hard-tanh STE);
* the last layer is binary too and is followed by batch norm (its outputs are the logits).

Binary parameters are named ``<layer>.weight`` with layers ``fc1, fc2, …`` / ``conv1, conv2, …`` so that logs and
reports say which layer is which.

Example:
    >>> import torch
    >>> from bnn_probe.models import BinaryMLP
    >>> model = BinaryMLP(64, [256, 32], 10)
    >>> model(torch.randn(5, 64)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .nn import BinaryActivation, BinaryConv1d, BinaryConv2d, BinaryLinear

__all__ = ["BinaryMLP", "BinaryNet", "BinaryCNN1d", "build_model", "MODEL_NAMES"]

MODEL_NAMES: tuple[str, ...] = ("mlp", "binarynet", "cnn1d")


def _norm1d(n: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm1d(n) if batch_norm else nn.Identity()


class BinaryMLP(nn.Sequential):
    """Binary multilayer perceptron with caller-chosen hidden widths (for wide-vs-thin studies).

    Layers: ``fc1: in → widths[0]``, …, ``fc{k+1}: widths[-1] → num_classes``; each followed by ``bn{i}``, hidden
    ones by a binary activation ``act{i}``. The input is flattened first.

    Args:
        in_features: input size after flattening (64 for digits, 40 for MNIST-1D).
        widths: hidden widths, e.g. ``[2048, 64, 1024]``.
        num_classes: output size.
        batch_norm: batch norm after every binary layer.
        ste: weight STE, ``"clipped"`` or ``"identity"``.
        scale: binary weight scaling, ``"none"``, ``"mean"`` or ``"fan_in"``.
    """

    def __init__(self, in_features: int, widths: Sequence[int], num_classes: int = 10, batch_norm: bool = True,
                 ste: str = "clipped", scale: str = "none") -> None:
        widths = [int(w) for w in widths]
        if any(w <= 0 for w in widths):
            raise ValueError(f"hidden widths must be positive integers, got {widths}")
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        sizes = [int(in_features), *widths, int(num_classes)]
        for i in range(len(sizes) - 1):
            k = i + 1
            layers[f"fc{k}"] = BinaryLinear(sizes[i], sizes[i + 1], ste=ste, scale=scale)
            layers[f"bn{k}"] = _norm1d(sizes[i + 1], batch_norm)
            if i < len(sizes) - 2:
                layers[f"act{k}"] = BinaryActivation()
        super().__init__(layers)
        self.widths = widths


class BinaryNet(nn.Module):
    """BinaryNet for 32×32×3 images (Courbariaux & Hubara et al. 2016):

    ``2×128C3 – MP2 – 2×256C3 – MP2 – 2×512C3 – MP2 – 2×1024FC – 10FC``, batch norm after every layer.
    At ``width_multiplier=1`` it has 14,022,016 binary weights. ``width_multiplier`` scales every channel and unit
    count (e.g. 0.125 for CPU runs).

    >>> BinaryNet(width_multiplier=0.125)(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, width_multiplier: float = 1.0, num_classes: int = 10, in_channels: int = 3,
                 batch_norm: bool = True, ste: str = "clipped", scale: str = "none",
                 image_size: int = 32) -> None:
        super().__init__()
        if image_size % 8:
            raise ValueError(f"BinaryNet pools three times: image_size must be a multiple of 8, got {image_size}")
        if width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")

        def c(n: int) -> int:
            return max(1, round(n * width_multiplier))

        chans = [in_channels, c(128), c(128), c(256), c(256), c(512), c(512)]
        feats: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(6):
            k = i + 1
            feats[f"conv{k}"] = BinaryConv2d(chans[i], chans[i + 1], 3, padding=1, ste=ste, scale=scale)
            if i % 2 == 1:
                feats[f"pool{k}"] = nn.MaxPool2d(2)
            feats[f"bn{k}"] = nn.BatchNorm2d(chans[i + 1]) if batch_norm else nn.Identity()
            feats[f"act{k}"] = BinaryActivation()
        self.features = nn.Sequential(feats)
        hidden = c(1024)
        self.classifier = BinaryMLP(chans[-1] * (image_size // 8) ** 2, [hidden, hidden], num_classes,
                                    batch_norm=batch_norm, ste=ste, scale=scale)
        self.width_multiplier = width_multiplier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BinaryCNN1d(nn.Module):
    """Small binary 1-D conv net for MNIST-1D (inputs of shape (N, 40) or (N, 1, 40)).

    ``conv1: 1→c`` (k=5) – ``conv2: c→2c`` (k=3, MP2) – ``conv3: 2c→2c`` (k=3, MP2) – ``fc1`` – ``fc2 → classes``,
    with c = ``channels`` (default 32) and batch norm after every binary layer.

    >>> BinaryCNN1d()(torch.randn(4, 40)).shape
    torch.Size([4, 10])
    """

    def __init__(self, length: int = 40, num_classes: int = 10, channels: int = 32, hidden: int = 128,
                 batch_norm: bool = True, ste: str = "clipped", scale: str = "none") -> None:
        super().__init__()
        c = int(channels)
        bn = (lambda n: nn.BatchNorm1d(n)) if batch_norm else (lambda n: nn.Identity())
        self.features = nn.Sequential(OrderedDict(
            conv1=BinaryConv1d(1, c, 5, padding=2, ste=ste, scale=scale), bn1=bn(c), act1=BinaryActivation(),
            conv2=BinaryConv1d(c, 2 * c, 3, padding=1, ste=ste, scale=scale), pool2=nn.MaxPool1d(2),
            bn2=bn(2 * c), act2=BinaryActivation(),
            conv3=BinaryConv1d(2 * c, 2 * c, 3, padding=1, ste=ste, scale=scale), pool3=nn.MaxPool1d(2),
            bn3=bn(2 * c), act3=BinaryActivation(),
        ))
        self.classifier = BinaryMLP(2 * c * (length // 4), [hidden], num_classes, batch_norm=batch_norm,
                                    ste=ste, scale=scale)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


def build_model(name: str, *, in_shape: Sequence[int], num_classes: int, widths: Sequence[int] | None = None,
                width_multiplier: float = 1.0, batch_norm: bool = True, ste: str = "clipped",
                scale: str = "none") -> nn.Module:
    """Build a reference model by name (``mlp``, ``binarynet``, ``cnn1d``) for inputs of shape ``in_shape``
    (without the batch dimension)."""
    n_in = 1
    for d in in_shape:
        n_in *= int(d)
    if name == "mlp":
        return BinaryMLP(n_in, list(widths) if widths else [256, 256], num_classes, batch_norm=batch_norm,
                         ste=ste, scale=scale)
    if name == "binarynet":
        if len(in_shape) != 3:
            raise ValueError(f"binarynet needs image inputs (C, H, W); this dataset gives shape {tuple(in_shape)}")
        return BinaryNet(width_multiplier, num_classes, in_channels=int(in_shape[0]), batch_norm=batch_norm,
                         ste=ste, scale=scale, image_size=int(in_shape[1]))
    if name == "cnn1d":
        return BinaryCNN1d(length=int(in_shape[-1]), num_classes=num_classes, batch_norm=batch_norm, ste=ste,
                           scale=scale)
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODEL_NAMES)}")


def _n_binary(model: nn.Module) -> int:  # pragma: no cover - convenience for docs
    from .nn import binary_parameters

    return sum(p.numel() for p in binary_parameters(model))


if __name__ == "__main__":  # pragma: no cover
    print(_n_binary(BinaryNet()), torch.__version__)
