"""binary_init_: random ±1, seeded."""

from __future__ import annotations

import pytest
import torch

from bnn_probe.models import BinaryMLP
from bnn_probe.nn import binary_parameters
from bnn_probe.optim import binary_init_


def test_random_pm1_seeded_and_reproducible():
    a, b, c = BinaryMLP(64, [32], 10), BinaryMLP(64, [32], 10), BinaryMLP(64, [32], 10)
    binary_init_(a, seed=3)
    binary_init_(b, seed=3)
    binary_init_(c, seed=4)
    for pa, pb, pc in zip(binary_parameters(a), binary_parameters(b), binary_parameters(c), strict=True):
        assert set(pa.unique().tolist()) == {-1.0, 1.0}
        assert torch.equal(pa, pb)
        assert not torch.equal(pa, pc)
    frac = binary_parameters(a)[0].eq(1).float().mean().item()
    assert 0.4 < frac < 0.6  # 2048 fair coins
    assert torch.equal(a.bn1.weight, torch.ones(32))  # real-valued parameters untouched


def test_tensors_generator_and_no_binary():
    t = torch.zeros(3, 5)
    g = torch.Generator().manual_seed(0)
    out = binary_init_([t], generator=g)
    assert out[0] is t and set(t.unique().tolist()) <= {-1.0, 1.0}
    torch.manual_seed(7)
    u = binary_init_(torch.zeros(100))[0]
    torch.manual_seed(7)
    assert torch.equal(u, binary_init_(torch.zeros(100))[0])  # governed by torch.manual_seed
    with pytest.raises(ValueError, match="no binary"):
        binary_init_(torch.nn.Linear(2, 2))
