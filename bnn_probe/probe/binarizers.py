"""Binarizers: the map b(w) from a stored parameter to the binary weight the forward pass uses.

The probe measures b(w), not the raw parameter: flips, c2i, per-weight counters, snapshots, sign hashes and the
tracked signs all follow the layer's binarizer. It is an explicit stage of the measurement: every step the flat
weights of a group go through :meth:`Binarizer.positive` (the bool mask ``b(w) = +1``) before anything is counted.

* ``b(w) ∈ {−1, +1}`` (or {−1, 0, +1} for a binarizer that keeps 0, :attr:`Binarizer.keeps_zero`): the probe stores the
  bool ``positive = [b(w) > 0]``, so with a 0-keeping binarizer a change +1 ↔ 0 counts as a flip and 0 ↔ −1 does not;
  the probe warns when the forward pass does map weights to 0 (docs/integrations.md).
* sign(0) as the library defines it: :class:`Sign` with ``zero=+1`` (bnn-probe, brevitas, bitorch ``sign``),
  ``zero=-1`` (bitorch ``steheaviside``, 1-bit DoReFa: 0 ↦ −1), ``zero=0`` (``torch.sign``: bnn's XNOR binarizer).
* latent inertia of a weight = :meth:`Binarizer.margin`: the distance of the binarizer's input to its decision
  boundary 0, in the weight's units (sign: |w̃|; bnn's centred XNOR: |w̃ − mean(w̃, dim=1)|).
* scaling factors (XNOR α = ‖W_c‖₁/n per output channel, brevitas' scale) are not part of b(w):
  :meth:`Binarizer.scale` returns them per output channel and the probe records them in the ``scales`` table.

The default :data:`SIGN` (``b(w) = +1`` iff ``w ≥ 0``) is bnn-probe's definition and keeps the probe's fast path
(one comparison of the flat group), bit-identical to a probe without binarizers.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.3, -0.1, 0.0], [-2.0, 1.0, 0.5]])
    >>> Sign(zero=-1).positive(w).tolist()
    [[True, False, False], [False, True, True]]
    >>> Centered().positive(w).tolist()  # w − row mean: [0.233, −0.167, −0.067], [−1.833, 1.167, 0.667]
    [[True, False, False], [False, True, True]]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ..errors import BnnProbeError

__all__ = ["Binarizer", "Sign", "Centered", "FromFunction", "SIGN", "as_binarizer", "binarizer_for"]


def _positive(x: Tensor, zero: int) -> Tensor:
    """[b(x) = +1] for sign with sign(0) = ``zero`` (+1: x ≥ 0; −1 or 0: x > 0)."""
    return x >= 0 if zero == 1 else x > 0


class Binarizer:
    """b(w) of one layer. Subclasses implement :meth:`positive` (and :meth:`margin`, :meth:`scale` where they differ).

    All methods take the parameter in its own shape (detached) and return tensors of that shape (``scale``: one value
    per output channel, dim 0) on its device; none synchronises with the host."""

    name: str = "binarizer"
    #: b may output 0 (``torch.sign``): the probe counts such weights and warns when there are any
    keeps_zero: bool = False
    #: the probe's own sign (w ≥ 0 ↦ +1), measured on the flat fast path
    is_default: bool = False

    def positive(self, w: Tensor) -> Tensor:  # pragma: no cover - abstract
        """bool: b(w) = +1."""
        raise NotImplementedError

    def zeros(self, w: Tensor) -> Tensor | None:
        """bool: b(w) = 0 (None when the binarizer never outputs 0)."""
        return None

    def margin(self, w: Tensor) -> Tensor:
        """Distance of the binarizer's input to the decision boundary (latent inertia); default |w|."""
        return w.abs()

    def scale(self, w: Tensor) -> Tensor | None:
        """The factor the forward pass multiplies b(w) with, per output channel (float64), or None (= 1)."""
        return None

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class Sign(Binarizer):
    """b(w) = sign(w) with sign(0) = ``zero`` (+1 default, −1, or 0 = ``torch.sign``).

    ``scale``: a function ``w -> α`` (a scalar or one value per output channel) when the forward pass uses α·sign(w)
    (e.g. brevitas' constant scale 0.1); recorded as the layer's scale, not part of b(w)."""

    def __init__(self, zero: int = 1, scale: Callable[[Tensor], Tensor] | None = None, name: str | None = None) -> None:
        if zero not in (1, -1, 0):
            raise BnnProbeError(f"Sign(zero=...) must be +1, -1 or 0, got {zero!r}")
        self.zero = int(zero)
        self.keeps_zero = zero == 0
        self.is_default = zero == 1  # positive and margin are bnn-probe's: the flat fast path
        self.scale_fn = scale
        self.name = name or f"sign(0)={'+1' if zero == 1 else zero}"

    def scale(self, w: Tensor) -> Tensor | None:
        if self.scale_fn is None:
            return None
        with torch.no_grad():
            a = torch.as_tensor(self.scale_fn(w)).detach().double().reshape(-1)
        return a.expand(w.shape[0] if w.dim() else 1) if a.numel() == 1 else a

    def positive(self, w: Tensor) -> Tensor:
        return _positive(w, self.zero)

    def zeros(self, w: Tensor) -> Tensor | None:
        return w == 0 if self.keeps_zero else None


class Centered(Binarizer):
    """b(w) = sign(w − mean(w, dim)) (XNOR-Net binarizer with centred weights, e.g. bnn's ``center_weights=True``).

    ``alpha=True`` also records XNOR-Net's α = ‖w_c − mean‖₁ / n_c per output channel c (Rastegari et al. 2016;
    n_c = weights per output channel) as the layer's scale. Margin (latent inertia): |w − mean(w, dim)|."""

    def __init__(self, dim: int | None = 1, zero: int = 0, alpha: bool = False) -> None:
        self.dim, self.zero, self.alpha = dim, int(zero), bool(alpha)
        self.keeps_zero = zero == 0
        self.name = f"sign(w - mean(w, dim={dim}))" if dim is not None else "sign(w)"

    def _centred(self, w: Tensor) -> Tensor:
        return w if self.dim is None else w - w.mean(self.dim, keepdim=True)

    def positive(self, w: Tensor) -> Tensor:
        return _positive(self._centred(w), self.zero)

    def zeros(self, w: Tensor) -> Tensor | None:
        return self._centred(w) == 0 if self.keeps_zero else None

    def margin(self, w: Tensor) -> Tensor:
        return self._centred(w).abs()

    def scale(self, w: Tensor) -> Tensor | None:
        if not self.alpha:
            return None
        return self._centred(w).abs().double().reshape(w.shape[0], -1).mean(1)


class FromFunction(Binarizer):
    """b(w) read from a library's own weight quantizer ``fn(w) -> α·b(w)`` (called without autograd).

    positive = [fn(w) > 0], zeros = [fn(w) = 0] (``keeps_zero``), scale = mean |fn(w)| per output channel (1 for a
    plain ±1 quantizer). ``margin`` (latent inertia) defaults to |w| (the quantizer's decision boundary at 0)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str = "function", keeps_zero: bool = False,
                 margin: Callable[[Tensor], Tensor] | None = None, scaled: bool = True) -> None:
        self.fn, self.name, self.keeps_zero, self._margin, self.scaled = fn, name, keeps_zero, margin, scaled

    def values(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            v = self.fn(w)
        v = getattr(v, "value", v)  # brevitas QuantTensor
        if not isinstance(v, Tensor) or v.shape != w.shape:
            raise BnnProbeError(f"binarizer {self.name!r} returned {type(v).__name__} of shape "
                                f"{getattr(v, 'shape', '?')}, expected a tensor of the weight's shape {tuple(w.shape)}")
        return v.detach()

    def positive(self, w: Tensor) -> Tensor:
        return self.values(w) > 0

    def zeros(self, w: Tensor) -> Tensor | None:
        return self.values(w) == 0 if self.keeps_zero else None

    def margin(self, w: Tensor) -> Tensor:
        return self._margin(w) if self._margin is not None else w.abs()

    def scale(self, w: Tensor) -> Tensor | None:
        if not self.scaled:
            return None
        return self.values(w).abs().double().reshape(w.shape[0] if w.dim() else 1, -1).mean(1)


#: bnn-probe's sign: b(w) = +1 iff w ≥ 0
SIGN = Sign()

BinarizerSpec = Binarizer | Callable[[Tensor], Tensor] | Mapping[str, "Binarizer | Callable[[Tensor], Tensor]"] | None


def as_binarizer(b: Binarizer | Callable[[Tensor], Tensor] | None, name: str = "user") -> Binarizer:
    """A :class:`Binarizer` from a user value: a Binarizer as is, a callable ``w -> b(w)`` wrapped in
    :class:`FromFunction` (values ≤ 0 count as −1, exact zeros are reported), None = :data:`SIGN`."""
    if b is None:
        return SIGN
    if isinstance(b, Binarizer):
        return b
    if callable(b):
        return FromFunction(b, name=getattr(b, "__name__", name), keeps_zero=True, scaled=False)
    raise BnnProbeError(f"binarizer= must be a Binarizer, a callable w -> b(w), or a mapping name -> one of them; "
                        f"got {type(b).__name__}")


def binarizer_for(spec: BinarizerSpec, names: list[str]) -> dict[str, Binarizer]:
    """The user's ``binarizer=`` per selected parameter name (names it does not cover are left out)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in names]
        if unknown:
            raise BnnProbeError(f"binarizer= names parameters that are not selected as binary: {', '.join(unknown)}")
        return {k: as_binarizer(v, k) for k, v in spec.items()}
    b = as_binarizer(spec)
    return dict.fromkeys(names, b)
