"""The compiled one-pass CPU measurement (bnn_probe/probe/_pass.c through probe/cpu_pass.py) against direct
numpy computations on small arrays: every count column, the margin ladder, the per-weight state byte, the incremental
sign hash, the pre-step pass, non-finite gradients and a NaN τ; several layers read through the pointer table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _probe_helpers import ladder_margins

from bnn_probe.probe import cpu_pass
from bnn_probe.probe.cpu_pass import NC_BOP, NC_LAT, S_ABOVE, S_FLIP, S_SIGN, S_SIGN0
from bnn_probe.runlog.schema import MARGIN_LADDER

pytestmark = pytest.mark.skipif(not cpu_pass.available(), reason="the compiled pass is not built")


@pytest.fixture(params=["detected", "portable"], autouse=True)
def simd(request):
    """Every test twice: with the kernels the CPU supports (AVX-512 where present) and with the portable loops."""
    cpu_pass.load()["set_simd"](-1 if request.param == "detected" else 0)
    yield request.param
    cpu_pass.load()["set_simd"](-1)


def _ptrs(xs: list[np.ndarray]) -> np.ndarray:
    return np.array([x.ctypes.data for x in xs], dtype=np.uintp)


class Case:
    """Random layers of the given sizes with signs before/after the step, m, g (with NaN/inf), a state byte."""

    def __init__(self, ns: list[int], dtype, seed: int = 0, taus: list[float] | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.ns, self.L, self.N = ns, len(ns), sum(ns)
        self.offs = np.cumsum([0, *ns[:-1]]).astype(np.int64)
        self.dtype = np.dtype(dtype)
        self.k = cpu_pass.load()[self.dtype]
        self.w = [np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(dtype) for n in ns]
        flip = [rng.random(len(w)) < 0.2 for w in self.w]  # ~20 % flipped, the first weight always
        for f in flip:
            f[0] = True
        self.w_prev_sign = [np.where(f, w < 0, w >= 0) for f, w in zip(flip, self.w, strict=True)]
        self.sign0 = [rng.random(n) < 0.5 for n in ns]
        self.prev_above = [rng.random(n) < 0.3 for n in ns]
        self.m = [(rng.standard_normal(n) * 2e-6).astype(dtype) for n in ns]
        self.g = [rng.standard_normal(n).astype(dtype) for n in ns]
        self.g[0][:3] = [np.nan, np.inf, -np.inf]
        self.taus = taus or [1e-6] * self.L
        self.state = np.concatenate([ps * S_SIGN + s0 * S_SIGN0 + pa * S_ABOVE for ps, s0, pa in
                                     zip(self.w_prev_sign, self.sign0, self.prev_above, strict=True)]).astype(np.uint8)
        self.mix = rng.integers(0, 2**31 - 1, self.N).astype(np.int32)
        # the hash of the stored (pre-step) signs
        self.hash = np.array([int(self.mix[o:o + n][ps].astype(np.int64).sum()) for o, n, ps in
                              zip(self.offs, ns, self.w_prev_sign, strict=True)], dtype=np.int64)

    def bop_post(self, t: int = 7, skip_g: tuple[int, ...] = ()):
        L, N, d = self.L, self.N, self.dtype
        tau = np.array(self.taus, dtype=d)
        thr = np.array([sorted(d.type(k * t_) for k in MARGIN_LADDER) for t_ in self.taus], dtype=d).reshape(-1)
        tv = np.array([t_ == t_ for t_ in self.taus], dtype=np.uint8)
        self.m_out, self.wm_out = np.empty(N, d), np.empty(N, d)
        self.count = np.arange(N, dtype=np.int32) % 3
        self.last = np.arange(N, dtype=np.int32) % 5
        self.count0, self.last0 = self.count.copy(), self.last.copy()
        self.fidx, self.flast = np.empty(N, np.int64), np.empty(N, np.int32)
        self.counts, self.sum_abs = np.zeros((L, NC_BOP), np.int64), np.zeros(L)
        P = cpu_pass.Plan()
        P.L, P.t = L, t
        gp = _ptrs(self.g)
        gp[list(skip_g)] = 0  # gradients proved finite elsewhere: not read
        P.set(lens=np.array(self.ns, dtype=np.int64), offs=self.offs, wp=_ptrs(self.w), mp=_ptrs(self.m),
              gp=gp, tau=tau, thr=thr, tau_valid=tv, state=self.state, m_out=self.m_out,
              wm_out=self.wm_out, count=self.count, last=self.last, mix=self.mix, hash=self.hash, fidx=self.fidx,
              flast=self.flast, counts=self.counts, sum_abs=self.sum_abs)
        return self.k.bop_post(P)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ns", [[3], [8, 16], [13, 1, 700, 1025]])
def test_bop_post_counts_state_and_hash_match_direct_computation(ns, dtype):
    c = Case(ns, dtype, seed=len(ns))
    state0 = c.state.copy()
    nf = c.bop_post(t=7)
    flipped_all = []
    for li, o in enumerate(c.offs):
        n, d = ns[li], c.dtype
        w, m, g = c.w[li], c.m[li], c.g[li]
        s = w >= 0
        f = s != c.w_prev_sign[li]
        am = np.abs(m)
        above = am > d.type(c.taus[li])
        pa = c.prev_above[li]
        x = np.where(f, -(w * m), w * m)
        want = [f.sum(), (s != c.sign0[li]).sum(), (~np.isfinite(g)).sum(), above.sum(), (above & ~pa).sum(),
                (pa & ~above).sum(), *[(x > d.type(k * c.taus[li])).sum() for k in MARGIN_LADDER]]
        assert c.counts[li].tolist() == [int(v) for v in want], li
        assert c.sum_abs[li] == pytest.approx(am.astype(np.float64).sum(), rel=1e-14)
        sl = slice(o, o + n)
        want_state = s * S_SIGN + c.sign0[li] * S_SIGN0 + above * S_ABOVE + f * S_FLIP
        assert np.array_equal(c.state[sl] & 0x0F, want_state.astype(np.uint8))  # bit 4 is scratch
        assert np.array_equal(c.m_out[sl], m) and np.array_equal(c.wm_out[sl], w * m)
        # the hash now is Σ r_i over b(w_t) = +1, exactly
        assert c.hash[li] == c.mix[sl][s].astype(np.int64).sum()
        flipped_all.append(np.flatnonzero(f) + o)
    fl = np.concatenate(flipped_all)
    assert nf == len(fl) > 0
    assert np.array_equal(c.fidx[:nf], fl)
    assert np.array_equal(c.flast[:nf], c.last0[fl])  # last-flip step before this one
    assert np.array_equal(c.count - c.count0, np.isin(np.arange(c.N), fl).astype(np.int32))
    assert (c.last[fl] == 7).all() and np.array_equal(np.delete(c.last, fl), np.delete(c.last0, fl))
    assert not np.array_equal(state0, c.state)


def test_bop_post_nan_tau_keeps_the_above_mask_and_counts_nothing_above():
    c = Case([50, 60], np.float32, seed=3, taus=[float("nan"), 1e-6])
    pa0 = c.prev_above[0].copy()
    c.bop_post()
    assert c.counts[0, 3:].tolist() == [0, 0, int(pa0.sum())] + [0] * 7  # above, up = 0; every kept bit is "down"
    assert np.array_equal((c.state[:50] & S_ABOVE) > 0, pa0)  # |m| > NaN is false: the mask is kept
    assert c.counts[1, 3] > 0  # the other layer counts as usual


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pre_pass_updates_only_changed_signs_and_the_hash(dtype):
    rng = np.random.default_rng(5)
    ns = [600, 7]
    k = cpu_pass.load()[np.dtype(dtype)]
    w = [rng.standard_normal(n).astype(dtype) for n in ns]
    stored = [rng.random(n) < 0.5 for n in ns]
    extra = [rng.random(n) < 0.5 for n in ns]  # S_SIGN0 | S_ABOVE | S_FLIP bits must stay
    state = np.concatenate([s * S_SIGN + e * (S_SIGN0 | S_ABOVE | S_FLIP) for s, e in
                            zip(stored, extra, strict=True)]).astype(np.uint8)
    mix = rng.integers(0, 2**31 - 1, sum(ns)).astype(np.int32)
    offs = [0, ns[0]]
    h = np.array([mix[o:o + n][s].astype(np.int64).sum() for o, n, s in zip(offs, ns, stored, strict=True)])
    lens = np.array(ns, dtype=np.int64)
    copy = np.empty(sum(ns), dtype=dtype)
    P = cpu_pass.Plan()
    P.L = 2
    P.set(lens=lens, wp=_ptrs(w), state=state, mix=mix, hash=h)
    changed = k.pre(P, copy.ctypes.data)
    now = [x >= 0 for x in w]
    assert changed == sum(int((a != b).sum()) for a, b in zip(now, stored, strict=True))
    want = np.concatenate([s * S_SIGN + e * (S_SIGN0 | S_ABOVE | S_FLIP) for s, e in zip(now, extra, strict=True)])
    assert np.array_equal(state, want.astype(np.uint8))
    assert h.tolist() == [int(mix[o:o + n][s].astype(np.int64).sum()) for o, n, s in zip(offs, ns, now, strict=True)]
    assert np.array_equal(copy, np.concatenate(w))


def test_latent_post_counts_match_direct_computation():
    rng = np.random.default_rng(11)
    ns = [40, 530]
    k = cpu_pass.load()[np.dtype(np.float32)]
    w = [(rng.standard_normal(n) * 0.3).astype(np.float32) for n in ns]
    g = [rng.standard_normal(n).astype(np.float32) for n in ns]
    g[1][5] = np.nan
    prev = [rng.random(n) < 0.5 for n in ns]
    s0 = [rng.random(n) < 0.5 for n in ns]
    state = np.concatenate([p * S_SIGN + a * S_SIGN0 for p, a in zip(prev, s0, strict=True)]).astype(np.uint8)
    clip = np.array([0.25, np.nan], dtype=np.float32)
    cv = np.array([1, 0], dtype=np.uint8)
    N = sum(ns)
    count, last = np.zeros(N, np.int32), np.zeros(N, np.int32)
    fidx, flast = np.empty(N, np.int64), np.empty(N, np.int32)
    counts, sa = np.zeros((2, NC_LAT), np.int64), np.zeros(2)
    lens = np.array(ns, dtype=np.int64)
    P = cpu_pass.Plan()
    P.L, P.t = 2, 3
    P.set(lens=lens, offs=np.array([0, ns[0]], dtype=np.int64), wp=_ptrs(w), gp=_ptrs(g), clip=clip,
          clip_valid=cv, state=state, count=count, last=last, fidx=fidx, flast=flast, counts=counts, sum_abs=sa)
    nf = k.lat_post(P)
    for li in range(2):
        s = w[li] >= 0
        f = s != prev[li]
        at = (np.abs(w[li]) >= clip[li]).sum() if cv[li] else 0
        assert counts[li].tolist() == [f.sum(), (s != s0[li]).sum(), (~np.isfinite(g[li])).sum(), at]
        assert sa[li] == pytest.approx(np.abs(w[li]).astype(np.float64).sum(), rel=1e-14)
    assert nf == int(count.sum()) > 0 and (last[fidx[:nf]] == 3).all()


def test_probe_uses_the_compiled_pass_on_cpu_and_the_torch_path_when_disabled(tmp_path, monkeypatch):
    import bnn_probe
    from bnn_probe.optim import Bop

    lin = torch.nn.Linear(8, 4, bias=False)
    from bnn_probe.nn import mark_binary

    mark_binary(lin.weight)
    opt = Bop([lin.weight])
    probe = bnn_probe.attach(lin, opt, tmp_path / "a", tensorboard=False)
    assert probe.groups[0].onepass is not None
    probe.close()
    monkeypatch.setenv("BNN_PROBE_NO_KERNEL", "1")
    cpu_pass.load.cache_clear()
    try:
        probe = bnn_probe.attach(lin, opt, tmp_path / "b", tensorboard=False)
        assert probe.groups[0].onepass is None and probe.groups[0].fused
        probe.close()
    finally:
        monkeypatch.delenv("BNN_PROBE_NO_KERNEL")
        cpu_pass.load.cache_clear()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_histograms_match_searchsorted_including_edges_nan_and_inf(dtype):
    """bnnp_hist (lookup table + one comparison) against numpy's searchsorted(side="right") on values that sit
    exactly on the edges, just beside them, at 0, ±inf and NaN; stats against float64 numpy."""
    from bnn_probe.runlog.schema import HIST_EDGES

    rng = np.random.default_rng(2)
    k = cpu_pass.load()[np.dtype(dtype)]
    tau = dtype(1e-6)
    for q, kind in (("abs_m_rel", 0), ("wm_rel", 1), ("abs_m", 2), ("abs_w", 3)):
        edges = np.asarray(HIST_EDGES[q], dtype=np.float64)
        scale = tau if kind in (0, 1) else 1.0
        on = (edges * scale).astype(dtype)
        vals = np.concatenate([on, np.nextafter(on, np.inf), np.nextafter(on, -np.inf), [0, -0.0, np.inf, -np.inf],
                               (10 ** rng.uniform(-14, 4, 3000) * rng.choice([-1, 1], 3000))]).astype(dtype)
        n = len(vals)
        w = np.where(rng.random(n) < 0.5, -1.0, 1.0).astype(dtype)
        m = (vals * w).astype(dtype) if kind == 1 else vals  # w·m = vals for wm_rel
        if kind == 3:
            w = vals
        P = cpu_pass.Plan()
        P.L = 1
        P.set(lens=np.array([n], dtype=np.int64), wp=_ptrs([w]), mp=_ptrs([m]), tau=np.array([tau], dtype=dtype))
        cnt = np.zeros((1, len(edges) + 1), dtype=np.int64)
        stats = np.zeros((1, 4))
        lut = cpu_pass.hist_lut(edges)
        k.hist(P, kind, np.ones(1, np.uint8).ctypes.data, edges.ctypes.data, len(edges), lut.ctypes.data,
               cnt.ctypes.data, stats.ctypes.data)
        x = {0: np.abs(m) / tau, 1: (w * m) / tau, 2: np.abs(m), 3: np.abs(w)}[kind].astype(dtype).astype(np.float64)
        want = np.bincount(np.searchsorted(edges, x, side="right"), minlength=len(edges) + 1)
        assert np.array_equal(cnt[0], want), q
        fin = x  # no NaN here: min, max and the sums as numpy gives them
        assert stats[0, :2].tolist() == [fin.min(), fin.max()]
        with np.errstate(over="ignore", invalid="ignore"):
            assert stats[0, 2] == pytest.approx(fin.sum(), rel=1e-12, nan_ok=True)
    # NaN goes to the last bin and makes min/max NaN
    edges = np.asarray(HIST_EDGES["abs_w"], dtype=np.float64)
    w = np.array([np.nan, 0.5, 2.0], dtype=dtype)
    P = cpu_pass.Plan()
    P.L = 1
    P.set(lens=np.array([3], dtype=np.int64), wp=_ptrs([w]), mp=_ptrs([w]))
    cnt, stats = np.zeros((1, len(edges) + 1), dtype=np.int64), np.zeros((1, 4))
    lut = cpu_pass.hist_lut(edges)
    k.hist(P, 3, np.ones(1, np.uint8).ctypes.data, edges.ctypes.data, len(edges), lut.ctypes.data, cnt.ctypes.data,
           stats.ctypes.data)
    assert cnt[0, -1] == 1 and cnt.sum() == 3 and np.isnan(stats[0, :2]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hash_on", [1, 0])
def test_bop_rows_match_numpy_quantiles_of_the_sorted_sample(dtype, hash_on):
    """bnnp_bop_rows: the steps table's rows from the counts, Σ|m|, the sign hash and the sorted sample rows equal
    the numpy computation (numpy "linear" quantiles at the given positions, float64), NaN-padded rows and NaN data
    included, the latent columns NaN; without a hash the int64 sentinel."""
    rng = np.random.default_rng(4)
    k = cpu_pass.load()[np.dtype(dtype)]
    L, K, nfloat = 3, 300, 34
    ks = np.array([300, 250, 300], dtype=np.int64)
    samp = np.full((3, L, K), np.nan, dtype=dtype)
    for r in range(3):
        for li in range(L):
            samp[r, li, :ks[li]] = np.round(rng.standard_normal(ks[li]) * 4) / 4  # many ties
    samp[1, 2, :3] = [np.nan, -0.0, 0.0]
    samp.sort(axis=-1)
    qs, mq = (0.05, 0.25, 0.5, 0.75, 0.95), (0.5, 0.9, 0.99, 0.999)

    def positions(quants):
        pos = np.zeros((L, 2 * len(quants)), dtype=np.int64)
        frac = np.zeros((L, len(quants)))
        for li in range(L):
            x = np.asarray(quants) * (ks[li] - 1)
            pos[li, :len(quants)], pos[li, len(quants):] = np.floor(x), np.minimum(np.floor(x) + 1, ks[li] - 1)
            frac[li] = x - np.floor(x)
        return pos, frac

    qpos, qfrac = positions(qs)
    mpos, mfrac = positions(mq)
    counts = rng.integers(0, 1000, (L, NC_BOP)).astype(np.int64)
    hsh = rng.integers(-2**40, 2**40, L).astype(np.int64)
    sum_abs = rng.random(L) * 100
    lens = np.array([1000, 250, 4000], dtype=np.int64)
    rows_i, rows_f = np.zeros((L, 4), np.int64), np.zeros((L, nfloat))
    P = cpu_pass.Plan()
    P.L, P.K, P.Q, P.Qm, P.nfloat, P.hash_on = L, K, len(qs), len(mq), nfloat, hash_on
    P.set(lens=lens, counts=counts, hash=hsh, sum_abs=sum_abs, samp=samp, qpos=qpos, qfrac=qfrac, mpos=mpos,
          mfrac=mfrac, rows_i=rows_i, rows_f=rows_f)
    k.bop_rows(P)

    def quant(row, pos, frac):
        lo, hi = row[pos[:len(frac)]].astype(np.float64), row[pos[len(frac):]].astype(np.float64)
        return lo + (hi - lo) * frac

    for li in range(L):
        want_i = [*counts[li, :3], hsh[li] if hash_on else -(2**63)]
        assert rows_i[li].tolist() == want_i
        want_f = np.concatenate([counts[li, 3:13].astype(np.float64), [sum_abs[li] / lens[li]],
                                 quant(samp[0, li], qpos[li], qfrac[li]), quant(samp[1, li], qpos[li], qfrac[li]),
                                 quant(samp[2, li], mpos[li], mfrac[li]), np.full(nfloat - 25, np.nan)])
        np.testing.assert_array_equal(rows_f[li], want_f)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bop_post_without_a_gradient_counts_no_nonfinite_and_the_rest_alike(dtype):
    """A layer whose gradient pointer is 0 (the optimizer proved it finite) gets nonfinite_grads 0 and every other
    column, the state bytes and the hash exactly as when its gradient is read."""
    ns = [13, 1, 700, 1025]
    a, b = Case(ns, dtype), Case(ns, dtype)
    for c in (a, b):
        c.g[0][:] = np.where(np.isfinite(c.g[0]), c.g[0], 0.5)  # layer 0 finite, as its proof says
        c.g[2][5] = np.nan
    a.bop_post()
    b.bop_post(skip_g=(0, 3))
    assert b.counts[2, 2] == 1 and b.counts[[0, 3], 2].tolist() == [0, 0]
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.state, b.state)
    np.testing.assert_array_equal(a.hash, b.hash)
    np.testing.assert_array_equal(a.wm_out, b.wm_out)


def test_latent_step_events_tracked_and_rows_match_direct_computation():
    """bnnp_lat_step + bnnp_lat_rows (the latent family with the sign binarizer): flip events with (|w_{t−1}|,
    |w_t − w_{t−1}|) at the sampled flipped weights and NaN in empty slots, tracked weights (b(w_t), |w_t|,
    |w_t − w_{t−1}|), and the rows (means, |w| quantiles of the sorted sample, at_clip only where a clip is set)."""
    rng = np.random.default_rng(12)
    ns, E, K, nb, nfloat = [40, 530], 4, 64, 25, 34
    k = cpu_pass.load()[np.dtype(np.float32)]
    prev_w = (rng.standard_normal(sum(ns)) * 0.3).astype(np.float32)
    offs = np.array([0, ns[0]], dtype=np.int64)
    w = [prev_w[o:o + n] * np.where(rng.random(n) < 0.1, -1, 1).astype(np.float32) + np.float32(0.01)
         for o, n in zip(offs, ns, strict=True)]
    g = [np.ones(n, np.float32) for n in ns]
    state = ((prev_w >= 0) * S_SIGN).astype(np.uint8)
    N = sum(ns)
    count, last = np.zeros(N, np.int32), np.zeros(N, np.int32)
    counts, sa = np.zeros((2, NC_LAT), np.int64), np.zeros(2)
    tsel = np.array([1, 7, 39, 40, 41, 300, 569], dtype=np.int64)
    u = rng.random((2, E))
    ev_i, ev_safe, ev_f = np.zeros((2 * E, 2), np.int64), np.zeros(2 * E, np.int64), np.zeros((2 * E, 2))
    tr_sign, tr_out = np.zeros(len(tsel), np.uint8), np.zeros((len(tsel), 2))
    samp = np.full((3, 2, K), np.nan, dtype=np.float32)
    qidx = np.zeros((2, K), dtype=np.int64)
    ks = np.array([40, K], dtype=np.int64)
    qidx[0, :40] = np.arange(40)
    qidx[1] = np.sort(rng.choice(ns[1], K, replace=False))
    qpos = np.array([[1, 19, 38, 2, 20, 39], [3, 31, 59, 4, 32, 60]], dtype=np.int64)
    qfrac = np.array([[0.25, 0.5, 0.75], [0.1, 0.2, 0.3]])
    rows_i, rows_f = np.zeros((2, 4), np.int64), np.zeros((2, nfloat))
    P = cpu_pass.Plan()
    P.L, P.t, P.K, P.nev, P.ntr, P.Q, P.nfloat, P.hash_on, P.nbop = 2, 5, K, E, len(tsel), 3, nfloat, 0, nb
    P.set(lens=np.array(ns, dtype=np.int64), offs=offs, wp=_ptrs(w), gp=_ptrs(g),
          clip=np.array([0.25, np.nan], dtype=np.float32), clip_valid=np.array([1, 0], dtype=np.uint8), state=state,
          count=count, last=last, fidx=np.empty(N, np.int64), flast=np.empty(N, np.int32), counts=counts,
          sum_abs=sa, prev=prev_w, u=u, ev_i=ev_i, ev_safe=ev_safe, ev_f=ev_f, tsel=tsel, tr_sign=tr_sign,
          tr_out=tr_out, ks=ks, qidx=qidx, samp=samp, qpos=qpos, qfrac=qfrac, rows_i=rows_i, rows_f=rows_f,
          hash=np.zeros(2, np.int64))
    k.lat_step(P, 3)
    wf = np.concatenate(w)
    for s in range(2 * E):
        li = s // E
        if ev_i[s, 0] < 0:
            assert np.isnan(ev_f[s]).all()
            continue
        gi = offs[li] + ev_i[s, 0]
        assert (wf[gi] >= 0) != (prev_w[gi] >= 0)  # a flipped weight
        assert ev_f[s].tolist() == [float(abs(prev_w[gi])), abs(float(wf[gi]) - float(prev_w[gi]))]
    assert (ev_i[:, 0] >= 0).sum() == 2 * E  # both layers flipped more than E weights
    assert tr_sign.tolist() == (wf[tsel] >= 0).astype(np.uint8).tolist()
    np.testing.assert_array_equal(tr_out[:, 0], np.abs(wf[tsel]).astype(np.float64))
    np.testing.assert_array_equal(tr_out[:, 1], np.abs(wf[tsel].astype(np.float64) - prev_w[tsel]))
    samp[0].sort(axis=-1)
    k.lat_rows(P)
    for li in range(2):
        row = samp[0, li].astype(np.float64)
        q = row[qpos[li, :3]] + (row[qpos[li, 3:]] - row[qpos[li, :3]]) * qfrac[li]
        at = float((np.abs(w[li]) >= np.float32(0.25)).sum()) if li == 0 else np.nan
        want = np.r_[np.full(nb, np.nan), sa[li] / ns[li], q, at, np.full(nfloat - nb - 5, np.nan)]
        np.testing.assert_array_equal(rows_f[li], want)
        assert rows_i[li].tolist() == [*counts[li, :3], -(2**63)]


def _ladder_values(tau: float, rng: np.random.Generator) -> np.ndarray:
    """:func:`ladder_margins` and values spread over 2^-5 … 2^5 τ of either sign."""
    spread = abs(tau) * 2.0 ** rng.uniform(-5, 5, 200) * rng.choice([-1.0, 1.0], 200) if tau == tau else []
    return np.concatenate([ladder_margins(tau), np.array(spread, dtype=np.float32)])


def test_margin_ladder_counts_are_exact_at_its_points_for_every_kind_of_tau():
    """The AVX-512 kernel counts a ladder of points k·τ (k = 2^j, float32, normal and finite) from the margin's bits
    in one compare instead of seven (also where the last point, 2^128 for τ = 2^125, is +inf: its bits follow the
    largest float's); every other ladder (τ = 0, NaN, negative, a subnormal first point) takes the seven compares.
    Either way the counts equal numpy's x > k·τ exactly, at the points and one ulp either side, for ±inf, NaN, ±0
    and the extreme floats (the points in ascending order, as the probe passes them: for a negative τ that is not
    the order of k); a 1,000-weight layer whose margins all lie above 8τ overflows the kernel's 4-bit bucket fields
    unless they are emptied in time."""
    rng = np.random.default_rng(11)
    taus = [1e-6, 3.3e-3, 1e-40, 1e38, 2.0**125, -1e-6, 0.0, float("nan"), 1e-6]
    ns = [len(_ladder_values(t, rng)) + 13 for t in taus[:-1]] + [1000]
    c = Case(ns, np.float32, seed=5, taus=taus)
    xs = []
    for li, tau in enumerate(taus):
        if li == len(taus) - 1:  # every margin in the top bucket, a few just below the top point
            x = np.full(ns[li], np.float32(9 * tau), dtype=np.float32)
            x[::97] = np.nextafter(np.float32(8 * tau), np.float32(0))
        else:
            v = _ladder_values(tau, rng)
            x = np.concatenate([v, (rng.standard_normal(13) * 1e-6).astype(np.float32)])
            rng.shuffle(x)
        w = c.w[li]
        flipped = (w >= 0) != c.w_prev_sign[li]
        c.m[li][:] = x * w * np.where(flipped, -1, 1).astype(np.float32)  # w_{t-1}·m_t = x exactly (w = ±1)
        xs.append(x)
    c.bop_post()
    for li, (tau, x) in enumerate(zip(taus, xs, strict=True)):
        with np.errstate(over="ignore"):
            want = [int((x > t).sum()) for t in sorted(np.float32(k * tau) for k in MARGIN_LADDER)]  # (as passed)
        assert c.counts[li, NC_BOP - 7:].tolist() == want, (li, tau)
    assert c.counts[0, NC_BOP - 7:].tolist() != c.counts[0, NC_BOP - 1:].tolist() * 7  # the ladder is not flat
    assert c.counts[-1, NC_BOP - 1] == ns[-1] - len(range(0, ns[-1], 97))
