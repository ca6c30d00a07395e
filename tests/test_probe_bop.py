"""Every Bop-family quantity of the probe against a hand computation on a 12-weight layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _probe_helpers import MiniBop, MiniBop2nd, OneLayer, set_grad

import bnn_probe
from bnn_probe.runlog.schema import HIST_EDGES

GAMMA, TAU = 0.5, 0.1
STEPS = 4


def _grads(n: int = 12, steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(3, 4, generator=g) * 0.3 for _ in range(steps)]


def _w0() -> torch.Tensor:
    return torch.tensor([1.0, -1, 1, 1, -1, -1, 1, -1, 1, 1, -1, 1]).reshape(3, 4)


def _reference(grads, gamma=GAMMA, tau=TAU):
    """Hand computation of Bop and of every quantity, step by step (float32 like the optimizer)."""
    w = _w0().reshape(-1).clone()
    w0 = w.clone()
    m = torch.zeros(12)
    count = np.zeros(12, dtype=int)
    last = np.zeros(12, dtype=int)
    rows, events, tracked, ratios = [], [], [], []
    for t, g in enumerate(grads, start=1):
        g = g.reshape(-1)
        m_prev, w_prev = m.clone(), w.clone()
        m = m * (1 - gamma) + gamma * g
        w = torch.where(w_prev * m > tau, -w_prev, w_prev)
        fl = (w >= 0) != (w_prev >= 0)
        flips = int(fl.sum())
        ratios.append(flips / 12)
        wm = w * m
        margin = (w_prev * m).numpy().astype(np.float64)  # the pre-decision margin w_{t−1}·m_t
        c2i = 1 - int(((w >= 0) != (w0 >= 0)).sum()) / 12
        rows.append({
            "step": t, "flips": flips, "flip_ratio": flips / 12, "flip_ratio_running": float(np.mean(ratios)),
            "c2i": c2i, "c2i_corr": 2 * c2i - 1, "above_threshold": int((m.abs() > tau).sum()),
            **{f"margin_exceed_{name}": int((margin > k * tau).sum()) for name, k in (
                ("1_8", 1 / 8), ("1_4", 1 / 4), ("1_2", 1 / 2), ("1", 1), ("2", 2), ("4", 4), ("8", 8))},
            **{f"margin_q{name}": float(np.quantile(margin, q)) for name, q in (
                ("50", 0.5), ("90", 0.9), ("99", 0.99), ("999", 0.999))},
            "crossings_up": int(((m_prev.abs() <= tau) & (m.abs() > tau)).sum()),
            "crossings_down": int(((m_prev.abs() > tau) & (m.abs() <= tau)).sum()),
            "abs_m_mean": float(m.abs().double().mean()),
            **{f"abs_m_q{q:02d}": float(np.quantile(m.abs().numpy().astype(np.float64), q / 100))
               for q in (5, 25, 50, 75, 95)},
            **{f"wm_q{q:02d}": float(np.quantile(wm.numpy().astype(np.float64), q / 100))
               for q in (5, 25, 50, 75, 95)},
        })
        step = (m - m_prev).abs()  # step_size of the Bop state: |m_t − m_{t−1}|
        for i in np.nonzero(fl.numpy())[0]:
            events.append((t, int(i), float(tau - w_prev[i] * m_prev[i]), None if last[i] == 0 else t - last[i],
                           float(step[i])))
        for i in range(12):
            tracked.append((t, i, 1 if w[i] >= 0 else -1, float(tau - w[i] * m[i]), float(step[i])))
        count += fl.numpy()
        last[fl.numpy()] = t
    return rows, events, tracked, count, w, m


@pytest.fixture(params=["mini", "bnn_probe.optim.Bop"])
def bop_run(tmp_path, request):
    grads = _grads()
    model = OneLayer(_w0())
    if request.param == "mini":
        opt = MiniBop([model.w], gamma=GAMMA, threshold=TAU)
    else:
        from bnn_probe.optim import Bop

        opt = Bop([model.w], gamma=GAMMA, threshold=TAU)
    with bnn_probe.attach(model, opt, tmp_path / "run", quantile_every=1, hist_every=2, snapshot_every=2, track=100,
                          events_per_layer=100, tensorboard=False) as probe:
        for g in grads:
            set_grad(model, g)
            opt.step()
        assert probe.step == STEPS
    return bnn_probe.load_run(tmp_path / "run"), grads, model


def test_layer_table(bop_run):
    run, _, _ = bop_run
    row = run.layers.iloc[0]
    assert (row.layer, row.fan_in, row.fan_out, row.n_weights, row["shape"]) == ("w", 4, 3, 12, "3x4")
    assert row.family == "bop" and row.gamma == GAMMA and row.threshold == TAU and np.isnan(row.sigma)
    assert row.group == 0
    assert run.meta["family"] == "bop" and run.meta["model"]["n_binary_weights"] == 12
    assert run.status == "finished" and run.finished and run.meta["last_step"] == STEPS


def test_bop_step_quantities_match_hand_computation(bop_run):
    run, grads, model = bop_run
    rows, *_ , w_end, _ = _reference(grads)
    assert torch.equal(model.w.detach().reshape(-1), w_end)  # the mini Bop is the reference Bop
    steps = run.steps.set_index("step")
    assert list(steps.index) == [1, 2, 3, 4]
    assert sum(r["flips"] for r in rows) > 0 and sum(r["crossings_down"] for r in rows) > 0  # the test bites
    ladder = [sum(r[f"margin_exceed_{k}"] for r in rows) for k in ("1_8", "1_4", "1_2", "1", "2", "4", "8")]
    assert ladder == sorted(ladder, reverse=True) and ladder[0] > ladder[3] > ladder[-1]  # distinct rungs
    assert all(r["margin_exceed_1"] == r["flips"] for r in rows)  # Bop flips exactly the weights with margin > τ
    for r in rows:
        got = steps.loc[r["step"]]
        for k, v in r.items():
            if k == "step":
                continue
            assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (r["step"], k)
        assert got["gamma"] == GAMMA and got["threshold"] == TAU and got["nonfinite_grads"] == 0
        assert np.isnan(got["abs_w_mean"]) and np.isnan(got["at_clip"])


def test_bop_events_tracked_weight_flips(bop_run):
    run, grads, _ = bop_run
    _, events, tracked, count, _, _ = _reference(grads)
    ev = run.events.sort_values(["step", "index"])
    assert len(ev) == len(events) > 0
    for (t, i, inertia, since, step), (_, got) in zip(events, ev.iterrows(), strict=True):
        assert (got.step, got["index"]) == (t, i)
        assert got.inertia_before == pytest.approx(inertia, rel=1e-4, abs=1e-6)
        assert got.step_size == pytest.approx(step, rel=1e-5, abs=1e-7)
        # a flip crosses within one step: τ − w_{t−1}·m_{t−1} < w_{t−1}·(m_t − m_{t−1}) ≤ |m_t − m_{t−1}|
        assert got.inertia_before <= got.step_size * (1 + 1e-6)
        assert (pd_isna(got.steps_since_last_flip) if since is None else got.steps_since_last_flip == since)
    tr = run.tracked.sort_values(["step", "index"])
    assert len(tr) == len(tracked)
    for (t, i, s, inertia, step), (_, got) in zip(tracked, tr.iterrows(), strict=True):
        assert (got.step, got["index"], got.sign) == (t, i, s)
        assert got.inertia == pytest.approx(inertia, rel=1e-5, abs=1e-7)
        assert got.step_size == pytest.approx(step, rel=1e-5, abs=1e-7)
    wf = run.weight_flips
    expect = {k: int((count == k).sum()) for k in np.unique(count)}
    assert dict(zip(wf.flips_per_weight, wf.n, strict=True)) == expect
    assert set(wf.step) == {STEPS}


def pd_isna(x) -> bool:
    import pandas as pd

    return bool(pd.isna(x))


def test_bop_hists_and_snapshots(bop_run):
    run, grads, model = bop_run
    w = _w0().reshape(-1).clone()
    m = torch.zeros(12)
    ws, ms = {}, {}
    for t, g in enumerate(grads, start=1):
        m = m * (1 - GAMMA) + GAMMA * g.reshape(-1)
        w = torch.where(w * m > TAU, -w, w)
        ws[t], ms[t] = w.clone(), m.clone()
    for t in (2, 4):
        h = run.hists[run.hists.step == t]
        assert set(h.quantity) == {"abs_m_rel", "wm_rel", "abs_m"}
        for q, x in (("abs_m_rel", ms[t].abs() / TAU), ("wm_rel", ws[t] * ms[t] / TAU), ("abs_m", ms[t].abs())):
            edges = np.asarray(HIST_EDGES[q])
            expect = np.bincount(np.searchsorted(edges, x.double().numpy(), side="right"),
                                 minlength=len(edges) + 1)
            hq = h[h.quantity == q]
            got = np.zeros(len(edges) + 1, dtype=int)
            got[hq.bin.to_numpy()] = hq["count"].to_numpy()
            assert np.array_equal(got, expect), q
            assert hq["count"].sum() == 12
            for _, r in hq.iterrows():  # edges as documented: bin b is [e_{b-1}, e_b)
                lo = -np.inf if r.bin == 0 else edges[r.bin - 1]
                hi = np.inf if r.bin == len(edges) else edges[r.bin]
                assert (r.left, r.right) == (lo, hi)
        snap = run.snapshots[run.snapshots.step == t].iloc[0]
        assert snap.n_weights == 12
        assert snap.signs == np.packbits(ws[t].numpy() >= 0, bitorder="big").tobytes()
        bits = np.unpackbits(np.frombuffer(snap.signs, dtype=np.uint8), bitorder="big")[:12]
        assert np.array_equal(bits.astype(bool), ws[t].numpy() >= 0)


def test_sign_hash_equal_iff_signs_equal(tmp_path):
    grads = _grads()
    hashes = []
    for k in range(2):
        model = OneLayer(_w0())
        opt = MiniBop([model.w], gamma=GAMMA, threshold=TAU)
        with bnn_probe.attach(model, opt, tmp_path / f"r{k}", quantile_every=1, tensorboard=False):
            for g in grads:
                set_grad(model, g)
                opt.step()
        hashes.append(bnn_probe.load_run(tmp_path / f"r{k}").steps.sign_hash.tolist())
    assert hashes[0] == hashes[1]
    steps = bnn_probe.load_run(tmp_path / "r0").steps
    for a, b in zip(steps.itertuples(), steps.iloc[1:].itertuples(), strict=False):
        assert (a.sign_hash == b.sign_hash) == (b.flips == 0)


@pytest.mark.parametrize("real", [False, True])
def test_bop2nd_uses_normalised_momentum(tmp_path, real):
    grads = _grads()
    model = OneLayer(_w0())
    if real:
        from bnn_probe.optim import Bop2ndOrder

        opt = Bop2ndOrder([model.w], gamma=0.5, sigma=0.5, threshold=0.5)
    else:
        opt = MiniBop2nd([model.w], gamma=0.5, sigma=0.5, threshold=0.5)
    with bnn_probe.attach(model, opt, tmp_path / "run", quantile_every=1,
                          tensorboard=False, events_per_layer=100, track=100):
        for g in grads:
            set_grad(model, g)
            opt.step()
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.layers.family[0] == "bop2nd" and run.layers.sigma[0] == 0.5
    w = _w0().reshape(-1).clone()
    m = torch.zeros(12)
    v = torch.zeros(12)
    total = 0
    for t, g in enumerate(grads, start=1):
        g = g.reshape(-1)
        mh_prev, w_prev = m / (v.sqrt() + 1e-10), w.clone()
        m = m + 0.5 * (g - m)
        v = v + 0.5 * (g * g - v)
        mh = m / (v.sqrt() + 1e-10)
        w = torch.where(w_prev * mh > 0.5, -w_prev, w_prev)
        got = run.steps[run.steps.step == t].iloc[0]
        flips = int((w != w_prev).sum())
        total += flips
        margin = w_prev * mh  # Bop2ndOrder's margin uses the normalised m̂
        assert got.flips == flips == got.margin_exceed_1 == int((margin > 0.5).sum())
        assert got.margin_exceed_1_4 == int((margin > 0.125).sum()) and got.margin_exceed_4 == int((margin > 2).sum())
        assert got.margin_q90 == pytest.approx(float(np.quantile(margin.numpy().astype(np.float64), 0.9)), rel=1e-5)
        assert got.above_threshold == int((mh.abs() > 0.5).sum())
        assert got.abs_m_q50 == pytest.approx(float(np.quantile(mh.abs().numpy(), 0.5)), rel=1e-5)
        assert got.sigma == 0.5
        ev = run.events[run.events.step == t].sort_values("index")
        fl = np.nonzero((w != w_prev).numpy())[0]
        assert ev["index"].tolist() == fl.tolist()
        assert ev.step_size.tolist() == pytest.approx([float((mh - mh_prev)[i].abs()) for i in fl], rel=1e-4,
                                                      abs=1e-6)
        if t > 1:
            expect = [0.5 - float(w_prev[i] * mh_prev[i]) for i in fl]
            assert ev.inertia_before.tolist() == pytest.approx(expect, rel=1e-4, abs=1e-5)
    assert total > 0


def test_nonfinite_grads_counted_whether_or_not_the_optimizer_proved_them_finite(tmp_path):
    """bnn_probe's Bop tells the probe which gradients it proved finite (``grads_all_finite``), so the pass skips
    reading them; a gradient with NaN/±inf entries is still read and counted. A stale proof left on an optimizer
    before its step (a third-party Bop that never sets one) is cleared by the probe's pre-step hook, not trusted."""
    from _probe_helpers import MiniBop

    from bnn_probe.optim import Bop
    from bnn_probe.optim.nonfinite import FINITE_ATTR

    for name, make in (("bop", lambda ps: Bop(ps, gamma=0.5, threshold=0.1)),
                       ("mini", lambda ps: MiniBop(ps, gamma=0.5, threshold=0.1))):
        w = [torch.nn.Parameter(torch.ones(40)), torch.nn.Parameter(-torch.ones(24))]
        model = torch.nn.ParameterList(w)
        opt = make(w)
        with bnn_probe.attach(model, opt, tmp_path / name, tensorboard=False, binary=lambda n, p: True,
                              family="bop") as probe:
            for k in range(3):
                w[0].grad = torch.full((40,), 0.3)
                w[1].grad = torch.full((24,), -0.2)
                if k == 1:
                    w[1].grad[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
                if name == "mini":  # a false claim made before the step: must not be used
                    opt.__dict__[FINITE_ATTR] = frozenset(id(p) for p in w)
                opt.step()
            if name == "bop":
                assert opt.__dict__[FINITE_ATTR] == frozenset(id(p) for p in w)  # the last step's proof
            assert probe.step == 3
        steps = bnn_probe.load_run(tmp_path / name).steps.sort_values(["step", "layer"])
        assert steps.nonfinite_grads.tolist() == [0, 0, 0, 3, 0, 0], name
