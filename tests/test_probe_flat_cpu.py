"""The CPU bit-code histogram (8 codes per uint64 word + per-layer uint8 bincount) against a direct count."""

import numpy as np
import pytest
import torch

from bnn_probe.probe.flat import _BOP_BITS, _BOP_COUNTS, FlatGroup, _count_matrix


@pytest.mark.parametrize("ns", [[3], [8, 16], [13, 1, 27, 40]])
def test_codes_cpu_matches_direct_counts(ns):
    rng = np.random.default_rng(len(ns))
    g = FlatGroup.__new__(FlatGroup)
    g.N, g.NB, g.cpu = sum(ns), 1 << len(_BOP_BITS), True
    g.offsets = list(np.cumsum([0, *ns[:-1]]))
    g.layer_ends = [o + n for o, n in zip(g.offsets, ns, strict=True)]
    g.code = torch.empty(g.N, dtype=torch.uint8)
    g.count_mat = _count_matrix(_BOP_BITS, _BOP_COUNTS)
    masks = [torch.from_numpy(rng.random(g.N) < p) for p in (0.2, 0.5, 0.9, 0.6, 0.4)]
    field = torch.from_numpy(rng.integers(0, 8, g.N).astype(np.uint8))  # the margin ladder field (0…7)
    got = g._codes([*masks, field])
    b = {name: m.numpy() for name, m in zip(_BOP_BITS, masks, strict=False)}
    for li, (s, e) in enumerate(zip(g.offsets, g.layer_ends, strict=True)):
        sl = {k: v[s:e] for k, v in b.items()}
        f = field.numpy()[s:e]
        want = [sl["flipped"].sum(), sl["c2i"].sum(), (~sl["finite"]).sum(), sl["above"].sum(),
                (sl["above"] & ~sl["prev_above"]).sum(), (sl["prev_above"] & ~sl["above"]).sum(),
                *[(f > j).sum() for j in range(7)]]
        assert got[li].tolist() == [float(x) for x in want]


@pytest.mark.parametrize("per_weight_tau", [False, True])
def test_ladder_chunks_and_flipped_weights_match_direct_comparisons(monkeypatch, per_weight_tau):
    """The chunked CPU margin ladder (several chunks, a short last one) against x > k·τ with x = w_{t−1}·m_t."""
    import bnn_probe.probe.flat as flat
    from bnn_probe.runlog.schema import MARGIN_LADDER

    monkeypatch.setattr(flat, "_LADDER_CHUNK", 1000)
    rng = np.random.default_rng(7)
    n = 4321
    g = FlatGroup.__new__(FlatGroup)
    g.N, g.device, g._bufs = n, torch.device("cpu"), {}
    wm = torch.from_numpy((rng.standard_normal(n) * 4e-6).astype(np.float32))
    flipped = torch.from_numpy(rng.random(n) < 0.05)
    tau = torch.from_numpy(rng.choice([5e-7, 1e-6, 2e-6], n).astype(np.float32)) if per_weight_tau else 1e-6
    g.tau = tau
    got = g._ladder(wm, flipped, np.flatnonzero(flipped.numpy())).numpy().copy()
    x = torch.where(flipped, -wm, wm)
    want = sum((x > tau * k).numpy().astype(np.uint8) for k in MARGIN_LADDER)
    assert np.array_equal(got, want) and got.max() == 7 and got.min() == 0
    assert (got[flipped.numpy()] > 0).any()  # the flipped weights were recounted with −w·m
