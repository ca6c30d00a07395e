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
