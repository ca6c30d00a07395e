"""Probe lifecycle: schedules, context manager status, state_dict round trip (resume), non-zero DDP ranks."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _probe_helpers import MiniBop, OneLayer, set_grad

import bnn_probe
from bnn_probe.probe import Every, LogSpaced, Never, Schedule, as_schedule


def test_schedules():
    assert [s for s in range(1, 13) if Every(4)(s)] == [4, 8, 12]
    assert [s for s in range(1, 200) if LogSpaced(4)(s)] == [1, 2, 3, 6, 10, 18, 32, 56, 100, 178]
    assert not any(Never()(s) for s in range(100))
    assert isinstance(as_schedule(0), Never) and as_schedule(3).n == 3
    assert [s for s in range(1, 10) if as_schedule(lambda s: s % 3 == 1)(s)] == [1, 4, 7]


def _grads(k):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(12, generator=g) for _ in range(k)]


def _bop(w0=None):
    model = OneLayer(torch.tensor([1.0, -1] * 6) if w0 is None else w0)
    return model, MiniBop([model.w], gamma=0.5, threshold=0.2)


def test_cadences(tmp_path):
    model, opt = _bop()
    with bnn_probe.attach(model, opt, tmp_path / "run", every=2, hist_every=LogSpaced(4), snapshot_every=0,
                          track_every=3, tensorboard=False):
        for g in _grads(7):
            set_grad(model, g)
            opt.step()
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.steps.step.tolist() == [2, 4, 6]
    assert sorted(run.hists.step.unique()) == [1, 2, 3, 6]
    assert sorted(run.tracked.step.unique()) == [3, 6] and run.snapshots.empty
    assert run.meta["probe"]["every"] == {"kind": "every", "n": 2}
    # flips between logged steps are still counted per weight
    assert run.weight_flips.n.sum() == 12


def test_cadences_asked_ahead_follow_a_change_and_user_functions_are_asked_once_per_step(tmp_path):
    """Built-in schedules are asked 256 steps ahead; past that block, and after a cadence is set on the probe
    mid-run (an int converted as attach does), the steps logged follow the schedule in force at each step. A user
    function is asked at its step only, once per step, in order."""
    asked = {"user": [], "subclass": []}

    def every_5th(t):
        asked["user"].append(t)
        return t % 5 == 0

    class Fifth(Schedule):  # a user's subclass: not declared pure, so asked at its step only
        def __call__(self, t):
            asked["subclass"].append(t)
            return t % 5 == 0

    g = _grads(1)[0]
    for name, quantile_every in (("pure", 5), ("user", every_5th), ("subclass", Fifth())):
        model, opt = _bop()
        with bnn_probe.attach(model, opt, tmp_path / name, every=1, hist_every=100, snapshot_every=0, track=0,
                              events_per_layer=0, tensorboard=False, quantile_every=quantile_every) as probe:
            for t in range(1, 301):
                if t == 281:
                    probe.hist_every = 7  # steps 287, 294 (set between steps 280 and 281)
                set_grad(model, g * (1 if t % 2 else -1))
                opt.step()
        run = bnn_probe.load_run(tmp_path / name)
        assert sorted(run.hists.step.unique()) == [100, 200, 287, 294], name
        assert run.steps.step.tolist() == list(range(1, 301))
        q = run.steps.set_index("step").abs_m_q50
        assert q.notna().tolist() == [t % 5 == 0 for t in range(1, 301)], name
        assert run.meta["probe"]["hist_every"] == {"kind": "every", "n": 7}
    assert asked == {"user": list(range(1, 301)), "subclass": list(range(1, 301))}  # once per step, never ahead


def test_exception_marks_run_failed(tmp_path):
    model, opt = _bop()
    with pytest.raises(RuntimeError, match="boom"), bnn_probe.attach(model, opt, tmp_path / "run",
                                                                     tensorboard=False):
        set_grad(model, torch.ones(12))
        opt.step()
        raise RuntimeError("boom")
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.status == "failed" and not run.finished and run.meta["finished_at"]
    assert run.steps.step.tolist() == [1]


def test_state_dict_round_trip_equals_uninterrupted_run(tmp_path):
    grads = _grads(6)
    model, opt = _bop()
    with bnn_probe.attach(model, opt, tmp_path / "full", tensorboard=False, track=5, events_per_layer=4):
        for g in grads:
            set_grad(model, g)
            opt.step()
    full = bnn_probe.load_run(tmp_path / "full")

    model, opt = _bop()
    probe = bnn_probe.attach(model, opt, tmp_path / "res", tensorboard=False, track=5, events_per_layer=4)
    for g in grads[:3]:
        set_grad(model, g)
        opt.step()
    sd, model_sd, opt_sd = probe.state_dict(), model.state_dict(), opt.state_dict()
    probe.close()
    assert sd["step"] == 3 and sd["layers"]["w"]["count"].dtype == torch.int32

    model2, opt2 = _bop(torch.zeros(12))
    model2.load_state_dict(model_sd)
    opt2.load_state_dict(opt_sd)
    probe2 = bnn_probe.attach(model2, opt2, tmp_path / "res", tensorboard=False, track=5, events_per_layer=4,
                              resume=True, seed=99)
    probe2.load_state_dict(sd)
    for g in grads[3:]:
        set_grad(model2, g)
        opt2.step()
    assert probe2.step == 6
    probe2.close()
    res = bnn_probe.load_run(tmp_path / "res")
    cols = ["step", "layer", "flips", "flip_ratio_running", "c2i", "crossings_up", "crossings_down", "sign_hash"]
    pd.testing.assert_frame_equal(res.steps[cols], full.steps[cols])
    pd.testing.assert_frame_equal(res.weight_flips, full.weight_flips)
    pd.testing.assert_frame_equal(res.tracked, full.tracked)
    pd.testing.assert_frame_equal(res.events, full.events)
    assert res.status == "finished"


def test_nonzero_rank_writes_nothing(tmp_path):
    model, opt = _bop()
    calls = []
    probe = bnn_probe.attach(model, opt, tmp_path / "run", rank=1)
    probe.add_callback(lambda p, s: calls.append(s), every=2)
    for g in _grads(4):
        set_grad(model, g)
        opt.step()
    probe.log(loss=1.0)
    probe.close()
    assert probe.step == 4 and calls == [2, 4]
    assert not (tmp_path / "run").exists()


def test_case_optimizer_bop_plus_adam(tmp_path):
    from bnn_probe.models import BinaryMLP
    from bnn_probe.nn import binary_parameters
    from bnn_probe.optim import Bop, CaseOptimizer, binary_init_

    model = BinaryMLP(8, [6], 3)
    binary_init_(model, seed=0)
    bins = {id(p) for p in binary_parameters(model)}
    opt = CaseOptimizer(Bop(binary_parameters(model), gamma=0.1, threshold=1e-3),
                        torch.optim.Adam([p for p in model.parameters() if id(p) not in bins], lr=1e-2))
    with bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False) as probe:
        for _ in range(3):
            loss = model(torch.randn(5, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = bnn_probe.load_run(tmp_path / "run")
    assert probe.step == 3 and run.layers.family.tolist() == ["bop", "bop"]
    assert run.meta["optimizer"]["class"] == "CaseOptimizer" and run.meta["family"] == "bop"
    assert len(run.steps) == 6 and run.steps.above_threshold.notna().all()
