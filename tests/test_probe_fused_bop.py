"""Bop's C step with the probe's measurement inside it (optim/cstep.py, ``bnnp_bop_fused``) logs exactly what the
probe logs around any optimizer (pre pass, step, post pass): the same Bop trajectory measured both ways, with
per-layer τ, layer sizes off the vector width, non-finite gradient entries, a layer without a gradient, γ and τ
changed between steps, signs changed between steps and an inertia reset; on the AVX-512 kernel and on the portable
loops, float32 and float64."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from _probe_helpers import ladder_margins
from torch import nn

import bnn_probe
from bnn_probe.interventions import reset_inertia
from bnn_probe.nn import mark_binary
from bnn_probe.optim import Bop, binary_init_
from bnn_probe.probe import cpu_pass, onepass
from bnn_probe.probe.lane import Lane
from bnn_probe.runlog.schema import MARGIN_EXCEED, MARGIN_LADDER

pytestmark = pytest.mark.skipif(not cpu_pass.available(), reason="the compiled pass is not built")


@pytest.fixture(params=["detected", "portable"])
def simd(request):
    cpu_pass.load()["set_simd"](-1 if request.param == "detected" else 0)
    yield request.param
    cpu_pass.load()["set_simd"](-1)


def _model(dtype: torch.dtype) -> nn.Module:
    model = nn.Sequential(nn.Linear(7, 5, bias=False), nn.Linear(5, 37, bias=False), nn.Linear(37, 3, bias=False))
    for p in model.parameters():
        mark_binary(p)
    binary_init_(model, seed=0)
    return model.to(dtype)


def _bop(model: nn.Module, **impl) -> Bop:
    ps = list(model.parameters())
    return Bop([dict(params=ps[:1], threshold=2e-3), dict(params=ps[1:], threshold=5e-4)], gamma=0.05, **impl)


def _frames(path) -> dict[str, pd.DataFrame]:
    run = bnn_probe.load_run(path)
    out = {}
    for name in ("steps", "events", "tracked", "weight_flips", "hists"):
        df = getattr(run, name)
        out[name] = df[[c for c in df.columns if "time" not in c]].reset_index(drop=True)
    return out


def _random_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int, seed: int, scale: float) -> None:
    """``n`` optimizer steps on Gaussian gradients of standard deviation ``scale`` (a seeded stream)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * scale
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_step_logs_what_the_probe_logs_around_the_step(tmp_path, monkeypatch, simd, dtype):
    calls = {"run": 0, "decline": 0}
    run, decline = onepass.OnePass.run, onepass.OnePass.decline

    def counted_run(self, jobs):
        calls["run"] += 1
        return run(self, jobs)

    def counted_decline(self):
        calls["decline"] += 1
        return decline(self)

    monkeypatch.setattr(onepass.OnePass, "run", counted_run)
    monkeypatch.setattr(onepass.OnePass, "decline", counted_decline)
    ma = _model(dtype)
    mb, mc = copy.deepcopy(ma), copy.deepcopy(ma)
    # the C step measured inside; the foreach step measured around by the compiled pass; and by the pure-torch path
    oa, ob, oc = _bop(ma), _bop(mb, foreach=True), _bop(mc, foreach=True)
    opts = dict(tensorboard=False, quantile_every=1, quantile_sample=16, track=8, events_per_layer=500, hist_every=2,
                snapshot_every=4)
    pa = bnn_probe.attach(ma, oa, tmp_path / "a", **opts)
    pb = bnn_probe.attach(mb, ob, tmp_path / "b", **opts)
    pc = bnn_probe.attach(mc, oc, tmp_path / "c", device_path=True, **opts)
    gen = torch.Generator().manual_seed(3)
    for t in range(1, 11):
        grads = [torch.randn(p.shape, generator=gen, dtype=dtype) * 2e-2 for p in ma.parameters()]
        if t == 3:  # non-finite entries: skipped by Bop, counted by both
            grads[1].view(-1)[[0, 17, 40]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
        for model, opt in ((ma, oa), (mb, ob), (mc, oc)):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = None if (t == 5 and p is list(model.parameters())[1]) else g.clone()
            if t == 6:  # signs changed between steps: not flips of the step, the hash follows
                with torch.no_grad():
                    list(model.parameters())[2].view(-1)[[0, 1, 50, 100]] *= -1
            if t == 4:  # hyperparameters changed between steps (a scheduler): the step and the probe follow
                opt.param_groups[0]["lr"] = 0.1
                opt.param_groups[1]["threshold"] = 1e-3
            if t == 8:  # an inertia reset between steps (the next step is measured against m before it)
                reset_inertia(opt, mode="shuffle", seed=1)
        for opt in (oa, ob, oc):
            opt.step()
        for p, q, r in zip(ma.parameters(), mb.parameters(), mc.parameters(), strict=True):
            assert torch.equal(p, q) and torch.equal(p, r)
    for probe in (pa, pb, pc):
        probe.close()
    # a: every step but step 8 (after the reset: measured around the C step); b: declined (foreach) but step 8
    assert calls == {"run": 9, "decline": 9}
    fa, fb, fc = _frames(tmp_path / "a"), _frames(tmp_path / "b"), _frames(tmp_path / "c")
    for name in fa:
        pd.testing.assert_frame_equal(fa[name], fb[name], check_exact=True, obj=name)
        # the pure-torch path: float64 sums to rounding
        pd.testing.assert_frame_equal(fa[name], fc[name], check_exact=False, rtol=1e-12, obj=name)
    steps = fa["steps"]
    assert steps.flips.sum() > 0 and len(fa["events"]) == steps.flips.sum()
    assert steps[steps.step == 3].nonfinite_grads.tolist() == [0, 3, 0]
    assert np.isfinite(fa["events"].step_size).all() and np.isfinite(fa["tracked"].step_size).all()
    assert sum(oa.state[p].get("nonfinite_skipped", 0) for p in ma.parameters()) == 3
    assert steps[steps.step == 5].threshold.tolist() == pytest.approx([2e-3, 1e-3, 1e-3])


def test_a_probe_on_a_foreach_bop_is_declined_and_measured_around_the_step(tmp_path, monkeypatch):
    """``foreach=True`` keeps torch's foreach step: the probe's request is declined before any weight moves."""
    calls = []
    decline = onepass.OnePass.decline
    monkeypatch.setattr(onepass.OnePass, "decline", lambda self: (calls.append(1), decline(self))[1])
    model = _model(torch.float32)
    opt = _bop(model, foreach=True)
    probe = bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    probe.close()
    assert calls == [1]


def test_a_request_left_by_a_step_that_never_ran_is_withdrawn_at_close(tmp_path):
    """The pre-step hook ran, the step did not (an exception in between): closing the probe takes the request back,
    and the next step of the optimizer is a plain C step."""
    from bnn_probe.optim.cstep import MEASURE_ATTR

    model = _model(torch.float32)
    opt = _bop(model)
    probe = bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False)
    probe._pre_hook(opt, (), {})
    assert len(opt.__dict__[MEASURE_ATTR]) == 1
    probe.close()
    assert opt.__dict__[MEASURE_ATTR] == []
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert bnn_probe.load_run(tmp_path / "run").steps.empty


def test_a_step_that_skips_bop_step_warns_and_measures_around_the_optimizer_from_then_on(tmp_path):
    """A probed optimizer whose step does not call the Bop's step (here: a wrapper that steps it through another
    route) leaves the request untaken: the probe warns, measures that step around the optimizer and stops
    asking."""
    model = _model(torch.float32)
    opt = _bop(model)
    probe = bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    probe._pre_hook(opt, (), {})
    opt.__dict__.pop("bnn_probe_measure_requests")  # the step never sees the request
    with torch.no_grad():
        for p in model.parameters():
            p.neg_()
    with pytest.warns(RuntimeWarning, match="did not run Bop.step"):
        probe._post_hook(opt, (), {})
    assert probe.groups[0].onepass.fuse_opt is None
    opt.step()  # measured around the optimizer now
    probe.close()
    steps = bnn_probe.load_run(tmp_path / "run").steps
    assert steps.step.tolist() == [1, 1, 1, 2, 2, 2]
    # step 1: the step never ran; every weight was negated in between, and the warning says those count as flips
    assert steps[steps.step == 1].flips.tolist() == [p.numel() for p in model.parameters()]


@pytest.mark.parametrize("impl", [{}, {"foreach": True}], ids=["measured-inside", "measured-around"])
def test_weight_flips_kept_flip_by_flip_equal_the_counters_bincount(tmp_path, monkeypatch, impl):
    """weight_flips.parquet from the histogram the pass keeps flip by flip equals the flips counted by hand, at every
    flush: while the histogram grows (2 bins at first), once a weight passes its largest size (8 bins: rebuilt from
    the counters at each flush), and after the counters were reloaded (state_dict round trip)."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(onepass, "FLIP_BINS", 2)
    monkeypatch.setattr(onepass, "FLIP_BINS_MAX", 8)
    torch.manual_seed(0)
    model = _model(torch.float32)
    params = list(model.parameters())
    opt = Bop(params, gamma=1.0, threshold=0.0, **impl)  # m = g: a weight flips whenever w·g > 0
    probe = bnn_probe.attach(model, opt, tmp_path / "run", flush_every_steps=1, hist_every=0, snapshot_every=0,
                             tensorboard=False)
    flips = [torch.zeros(p.shape, dtype=torch.int64) for p in params]
    rebuilt = []
    for step in range(1, 13):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape) * (1.0 if step % 3 else -1.0)
        opt.step()  # the probe flushes after every step
        for f, b, p in zip(flips, before, params, strict=True):
            f += (b != p.detach()).long()
        op = probe.groups[0].onepass
        rebuilt.append(bool(op.fover.any()))
        got = pq.read_table(tmp_path / "run" / "weight_flips.parquet").to_pandas()
        for li, f in enumerate(flips):
            want = torch.bincount(f.reshape(-1)).numpy()
            rows = got[got.layer == probe.layers[li].name]
            hist = np.zeros(int(rows.flips_per_weight.max()) + 1, dtype=np.int64)
            hist[rows.flips_per_weight.to_numpy()] = rows.n.to_numpy()
            np.testing.assert_array_equal(hist, want, err_msg=f"step {step}, layer {li}")
        if step == 5:  # the flush after the reload rebuilt the histograms and kept them again (counts < 8)
            assert not op.fover.any()
        if step == 4:
            assert max(int(f.max()) for f in flips) < 7
            probe.load_state_dict(probe.state_dict())  # counters reloaded: the histogram is rebuilt from them
            assert probe.groups[0].onepass.fover.all()
    probe.close()
    assert max(int(f.max()) for f in flips) >= 8  # some weight passed the largest histogram
    assert not all(rebuilt) and any(rebuilt)  # kept flip by flip at some flushes, rebuilt at others


def test_event_uniforms_drawn_ahead_are_the_per_step_draws_across_a_resume(tmp_path):
    """A group that is its generator's only user draws the event sampler's uniforms a block at a time
    (onepass.Uniforms), and the fused step gathers events and tracked weights right after its pass: the sampled
    events equal those of the pure-torch path, which draws [L, E] uniforms at each events step, also when the run
    is checkpointed and resumed in the middle of a block (the checkpoint stores the state of the draws used)."""
    E = 2  # fewer slots than flips: the uniforms decide which flips are sampled
    opts = dict(tensorboard=False, track=4, events_per_layer=E, events_every=2, quantile_every=1, quantile_sample=16)
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen) * 5e-2 for p in _model(torch.float32).parameters()]
             for _ in range(12)]

    def run(path, device_path, stop=None, sd=None, model_sd=None, opt_sd=None):
        model = _model(torch.float32)
        opt = _bop(model)
        if sd is not None:
            model.load_state_dict(model_sd)
            opt.load_state_dict(opt_sd)
        probe = bnn_probe.attach(model, opt, path, device_path=device_path, resume=sd is not None, **opts)
        if sd is not None:
            probe.load_state_dict(sd)
        for t in range(probe.step, stop or len(grads)):
            for p, g in zip(model.parameters(), grads[t], strict=True):
                p.grad = g.clone()
            opt.step()
        out = (probe.state_dict(), model.state_dict(), opt.state_dict()) if stop else None
        probe.close()
        return out

    run(tmp_path / "ref", device_path=True)
    run(tmp_path / "full", device_path=False)
    sd, model_sd, opt_sd = run(tmp_path / "res", device_path=False, stop=5)
    run(tmp_path / "res", device_path=False, sd=sd, model_sd=model_sd, opt_sd=opt_sd)
    ref, full, res = (_frames(tmp_path / n) for n in ("ref", "full", "res"))
    ev = full["events"]
    steps = full["steps"]
    # the uniforms mattered: some layer flipped more than E weights on an events step
    assert (steps[steps.step % 2 == 0].flips > E).any()
    assert len(ev) > 0 and set(ev.step) <= set(range(2, 13, 2))
    for name in ("events", "tracked", "steps"):
        pd.testing.assert_frame_equal(full[name], ref[name], check_exact=False, rtol=1e-12, obj=name)
        # (flip_ratio_running: a resumed run continues its running sum from the checkpoint, equal to rounding)
        pd.testing.assert_frame_equal(res[name], full[name], check_exact=name != "steps", rtol=1e-12, obj=name)


def test_uniforms_generator_state_is_the_state_after_the_slices_handed_out():
    gen = torch.Generator().manual_seed(11)
    u = onepass.Uniforms(gen, 3, 4, block=8)
    ref = torch.Generator().manual_seed(11)
    for k in range(11):  # across a block boundary
        addr = u.take()
        want = torch.rand(3, 4, generator=ref, dtype=torch.float64)
        got = u.buf.view(-1)[(addr - u.base) // 8:(addr - u.base) // 8 + 12].view(3, 4)
        assert torch.equal(got, want), k
        assert torch.equal(u.generator_state(), ref.get_state()), k


def test_tracked_weights_picked_up_in_the_pass_equal_the_gather_after_it(tmp_path):
    """The fused step picks the tracked weights up block by block in its pass when their indices ascend (as the
    probe samples them) and gathers them after the pass otherwise (indices from a checkpoint in any order): the
    same tracked rows, also on the steps whose tracked weights are not logged (m_{t−1} is kept for the next)."""
    frames = []
    for k, in_pass in enumerate((True, False)):
        model = _model(torch.float32)
        opt = _bop(model)
        probe = bnn_probe.attach(model, opt, tmp_path / str(k), tensorboard=False, track=40, track_every=3)
        op = probe.groups[0].onepass
        assert op.fuse_opt is opt and op.tsel_sorted
        op.tsel_sorted = in_pass
        _random_steps(model, opt, 10, seed=9, scale=3e-2)
        assert op.plan.trk_mode == (1 if in_pass else 0)  # step 10: tracked weights not logged
        probe.close()
        frames.append(_frames(tmp_path / str(k))["tracked"])
    assert sorted(set(frames[0].step)) == [3, 6, 9] and (frames[0].sign.diff() != 0).any()
    pd.testing.assert_frame_equal(frames[0], frames[1], check_exact=True)


def test_uniforms_drawn_ahead_are_capped_at_one_mebibyte():
    u = onepass.Uniforms(torch.Generator().manual_seed(0), 500, 64)  # 32,000 uniforms per step
    assert u.block == 4 and u.buf.numel() * 8 <= 1 << 20
    assert onepass.Uniforms(torch.Generator(), 3, 16).block == 256


def _lane_and_copied_logs(tmp_path, **options) -> tuple[list[dict[str, pd.DataFrame]], int]:
    """The same 11 Bop steps of a one-group model logged with the lane and without it (``probe._lane = None``):
    both logs' frames, and how many steps the lane took."""
    frames = []
    taken = {"lane": 0}
    post = Lane.post

    def counted_post(self, *args):
        ok = post(self, *args)
        taken["lane"] += ok
        return ok

    for k, lane in enumerate((True, False)):
        model = nn.Sequential(nn.Linear(9, 40, bias=False), nn.Linear(40, 3, bias=False))
        for p in model.parameters():
            mark_binary(p)
        binary_init_(model, seed=0)
        opt = Bop(model.parameters(), gamma=0.05, threshold=1e-3)
        probe = bnn_probe.attach(model, opt, tmp_path / str(k), tensorboard=False, buffer_steps=3, **options)
        assert probe._lane is not None
        if not lane:
            probe._lane = None
        Lane.post = counted_post
        try:
            _random_steps(model, opt, 11, seed=4, scale=4e-2)
        finally:
            Lane.post = post
        probe.close()
        frames.append(_frames(tmp_path / str(k)))
    for n in ("steps", "events", "tracked", "hists", "weight_flips"):
        pd.testing.assert_frame_equal(frames[0][n], frames[1][n], check_exact=True, obj=n)
    return frames, taken["lane"]


def test_probe_rows_written_in_place_equal_the_copied_rows(tmp_path):
    """A one-group Bop model: the compiled pass writes the steps rows, flip events and tracked weights straight into
    the recorder's buffers (Probe._lane, probe/lane.py); the log equals the one made by copying the pass's own
    buffers, across drains (buffer_steps=3), with cadences that differ by table, and on the histogram and snapshot
    steps the lane leaves to the general path."""
    frames, taken = _lane_and_copied_logs(tmp_path, track=6, track_every=2, events_per_layer=3, events_every=3,
                                          quantile_every=2, hist_every=4, snapshot_every=5)
    # steps 4, 8 (histograms) and 5, 10 (snapshots) went the general way
    assert taken == 7
    run = bnn_probe.load_run(tmp_path / "0")
    assert sorted(set(run.hists.step)) == [4, 8] and sorted(set(run.snapshots.step)) == [5, 10]
    assert len(frames[0]["steps"]) == 22 and sorted(set(frames[0]["tracked"].step)) == [2, 4, 6, 8, 10]
    assert len(frames[0]["events"]) > 0


def test_lane_with_a_sparse_steps_table_and_no_events_or_tracked_weights(tmp_path):
    """The lane on steps that log no steps row (``every=3``), with flip events and tracked weights off: every step
    goes through it, and the log equals the copied one."""
    frames, taken = _lane_and_copied_logs(tmp_path, every=3, events_per_layer=0, track=0, quantile_every=2)
    assert taken == 11
    assert sorted(set(frames[0]["steps"].step)) == [3, 6, 9] and len(frames[0]["events"]) == 0
    assert len(frames[0]["tracked"]) == 0 and frames[0]["steps"].abs_m_q50.notna().any()


def test_fused_step_counts_the_margin_ladder_exactly_at_its_points(tmp_path, simd):
    """Bop's C step with the measurement inside (``bnnp_bop_fused``) at γ = 1, where m_t = g_t and the margin is
    w_{t−1}·g_t exactly: the finite :func:`ladder_margins` and a spread over 2^-5 … 2^5 τ; 649 weights per layer
    (the 4-bit bucket fields of the AVX-512 kernel emptied in time), τ with a ladder of powers of two (one compare),
    τ = 2^125 (last point +inf) and τ = 1e-40 (subnormal points: the seven compares). The margin_exceed columns
    equal numpy's counts of x > k·τ in float32."""
    model = nn.Sequential(nn.Linear(59, 11, bias=False), nn.Linear(11, 59, bias=False),
                          nn.Linear(59, 11, bias=False))
    for p in model.parameters():
        mark_binary(p)
    binary_init_(model, seed=0)
    ps = list(model.parameters())
    taus = [1e-3, 2.0**125, 1e-40]
    opt = Bop([dict(params=[p], threshold=t) for p, t in zip(ps, taus, strict=True)], gamma=1.0)
    probe = bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False)
    rng = np.random.default_rng(4)
    f = np.float32
    want = []
    for _ in range(2):
        per_layer = []
        for p, tau in zip(ps, taus, strict=True):
            vals = ladder_margins(tau, finite=True)
            top = 5 if tau < 1e30 else 2.9  # (finite gradients: Bop skips the others)
            x = (tau * 2.0 ** rng.uniform(-5, top, p.numel()) * rng.choice([-1.0, 1.0], p.numel())).astype(f)
            x[:len(vals)] = vals
            rng.shuffle(x)
            w_prev = p.detach().reshape(-1).numpy().copy()
            p.grad = torch.from_numpy(x * w_prev).reshape(p.shape)  # w_{t-1}·g = x exactly (w = ±1)
            with np.errstate(over="ignore"):
                per_layer.append([int((x > f(k * tau)).sum()) for k in MARGIN_LADDER])
        opt.step()
        want.append(per_layer)
    probe.close()
    steps = bnn_probe.load_run(tmp_path / "run").steps.sort_values(["step", "layer"])
    got = steps[list(MARGIN_EXCEED)].to_numpy().astype(np.int64).reshape(2, 3, 7).tolist()
    assert got == want
    assert want[0][0][0] > want[0][0][3] > want[0][0][6] > 0  # the points are each crossed
