"""Optimizers for binarized neural networks.

* :class:`Bop` (Helwegen et al. 2019) and :class:`Bop2ndOrder` (Suarez-Ramirez et al. 2021): latent-free, flip a
  binary weight when its gradient momentum passes a threshold.
* Latent-weight baselines (BinaryConnect/BinaryNet) for any torch optimizer: :func:`clip_latent_weights`,
  :class:`LatentClipper`, :func:`glorot_lr_scale`, :func:`glorot_param_groups`.
* :class:`CaseOptimizer` / :func:`bnn_optimizer`: one optimizer object for a whole BNN.
* :func:`binary_init_`: random ±1 binary weights, seeded.
"""

from __future__ import annotations

from .bop import Bop
from .bop2nd import Bop2ndOrder
from .case import CaseOptimizer, bnn_optimizer
from .init import binary_init_
from .latent import LatentClipper, clip_latent_weights, glorot_lr_scale, glorot_param_groups

__all__ = [
    "Bop",
    "Bop2ndOrder",
    "CaseOptimizer",
    "bnn_optimizer",
    "binary_init_",
    "LatentClipper",
    "clip_latent_weights",
    "glorot_lr_scale",
    "glorot_param_groups",
]
