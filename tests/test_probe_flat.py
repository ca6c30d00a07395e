"""The vectorised probe (probe/flat.py) against the per-layer reference (context.StepContext + quantities) on
multi-layer models: several layers of different sizes (some above ``quantile_sample``), per-layer τ, Bop2ndOrder with
bias correction, latent SGD with clipping, Adam, and a mixed Bop + latent CaseOptimizer (several flat groups)."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import torch
from _probe_helpers import MULTI_KINDS, multi_setup

import bnn_probe
from bnn_probe.probe.context import LayerState, StepContext
from bnn_probe.probe.quantities import default_quantities
from bnn_probe.probe.samplers import Tracked


class Reference:
    """The probe's former per-layer computation, run from optimizer hooks next to the probe."""

    def __init__(self, probe, optimizer) -> None:
        self.probe = probe
        self.rows: dict[tuple[int, str], dict[str, float]] = {}
        self.tracked: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.events: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}  # flipped index -> step_size
        self.states = []
        for i, ly in enumerate(probe.layers):
            g, k = probe._layer_state(i)
            st = LayerState(ly, g.q_idx[k], g.t_idx[k])
            if ly.family != "latent":
                ctx = StepContext(st, 0, optimizer)
                st.prev_above = ctx.above if "exp_avg" in ly.optimizer.state.get(ly.param, {}) \
                    else torch.zeros_like(st.sign0)
                st.prev_m = ctx.m.clone()
            self.states.append(st)
        self.t = 0
        optimizer.register_step_pre_hook(self.pre)
        optimizer.register_step_post_hook(self.post)
        self.opt = optimizer

    def pre(self, *a) -> None:
        for st in self.states:
            st.before_step()

    def post(self, *a) -> None:
        self.t += 1
        qs = default_quantities(True)
        for st in self.states:
            ctx = StepContext(st, self.t, self.opt)
            row: dict[str, float] = {}
            for q in qs:
                if not q.applies(ctx):
                    continue
                vals = torch.cat([v.reshape(-1).double() for v in q.compute(ctx)]).tolist()
                cols = list(q.columns)
                assert len(vals) == len(cols), (q.name, len(vals), len(cols))
                row.update(dict(zip(cols, vals, strict=True)))
            self.rows[(self.t, st.layer.name)] = row
            s, inert, step = Tracked().compute(ctx)
            self.tracked[(self.t, st.layer.name)] = (s.numpy(), inert.numpy(), step.numpy())
            fl = ctx.flipped.nonzero().view(-1)
            self.events[(self.t, st.layer.name)] = (fl.numpy(), ctx.step_size_at(fl).numpy())
            ctx.commit()


def _is_quantile(col: str) -> bool:
    return re.search(r"_q\d+$", col) is not None


def _check(run, ref: Reference, quantile_every: int = 1) -> None:
    """Every logged value equals the reference's; the quantile columns are NaN off the ``quantile_every`` cadence."""
    steps = run.steps.set_index(["step", "layer"])
    assert len(steps) == len(ref.rows) > 0
    n_quant = 0
    for key, row in ref.rows.items():
        got = steps.loc[key]
        for c, v in row.items():
            if _is_quantile(c) and key[0] % quantile_every:
                assert pd.isna(got[c]), (key, c)
            elif math.isnan(v):
                assert pd.isna(got[c]), (key, c)
            else:
                assert not pd.isna(got[c]), (key, c)
                assert float(got[c]) == pytest.approx(v, rel=1e-12, abs=1e-300), (key, c, got[c], v)
                n_quant += _is_quantile(c)
    assert n_quant > 0  # quantile columns compared on the cadence's steps
    tr = run.tracked
    for (t, name), (s, inert, step) in ref.tracked.items():
        sub = tr[(tr.step == t) & (tr.layer == name)]
        assert sub.sign.tolist() == s.tolist()
        np.testing.assert_allclose(sub.inertia.to_numpy(), inert, rtol=1e-12)
        np.testing.assert_allclose(sub.step_size.to_numpy(), step, rtol=1e-12)
        assert np.isfinite(step).all()


def _check_events(run, ref: Reference) -> None:
    """Every flip is an event here: the events' step_size equals the reference's at each flipped weight."""
    ev = run.events.set_index(["step", "layer", "index"]).sort_index()
    n = 0
    for (t, name), (idx, step) in ref.events.items():
        for i, v in zip(idx.tolist(), step.tolist(), strict=True):
            assert float(ev.loc[(t, name, i), "step_size"]) == pytest.approx(v, rel=1e-12, abs=1e-300)
            n += 1
    assert n == len(ev) > 0


def _train(model, opt, steps: int = 6, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 0.5
        opt.step()


@pytest.mark.parametrize("kind", MULTI_KINDS)
def test_flat_equals_per_layer_reference(tmp_path, kind):
    model, opt = multi_setup(kind)
    probe = bnn_probe.attach(model, opt, tmp_path / "run", tensorboard=False, quantile_sample=100, track=8,
                             events_per_layer=2000, hist_every=3, quantile_every=2)
    if kind == "mixed":
        assert len(probe.groups) == 2
    ref = Reference(probe, opt)
    _train(model, opt)
    probe.close()
    run = bnn_probe.load_run(tmp_path / "run")
    _check(run, ref, quantile_every=2)
    _check_events(run, ref)
    # every flip is an event (events_per_layer exceeds every layer's size); weight_flips match the flips column
    flips = run.steps.groupby("layer").flips.sum()
    assert run.events.groupby("layer").size().reindex(flips.index, fill_value=0).tolist() == flips.tolist()
    assert flips.sum() > 0
    wf = run.weight_flips
    tot = (wf.flips_per_weight * wf.n).groupby(wf.layer).sum()
    assert tot.reindex(flips.index).tolist() == flips.tolist()
    assert not run.hists.empty


def test_cpu_bfloat16_layer_is_measured_by_the_device_path(tmp_path):
    """A CPU bfloat16 binary layer (which the compiled pass does not take) attaches and logs through the pure-torch
    path instead of failing at attach."""
    from bnn_probe.nn import mark_binary
    from bnn_probe.optim import Bop

    lin = torch.nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    mark_binary(lin.weight)
    opt = Bop([lin.weight], gamma=0.5, threshold=0.0)
    probe = bnn_probe.attach(lin, opt, tmp_path / "run", tensorboard=False)
    assert [g.fused for g in probe.groups] == [True]
    w0 = lin.weight.detach().clone()
    lin.weight.grad = torch.sign(w0) * 2  # m = sign(w): w·m > 0 = τ, every weight flips
    opt.step()
    probe.close()
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.steps.flips.tolist() == [32]


@pytest.mark.parametrize("kind", ["bop", "mixed"])
def test_quantile_cadence_same_on_both_paths(tmp_path, kind):
    """``quantile_every=3``: the quantile columns have values exactly on steps 3 and 6 (NaN on the other logged
    steps, every other column logged every step), on the compiled CPU pass and the pure-torch path alike; the
    default cadence (10) leaves them NaN on a 7-step run, and the run's meta.json records it."""
    runs = {}
    for dp in (False, True):
        torch.manual_seed(0)
        model, opt = multi_setup(kind)
        probe = bnn_probe.attach(model, opt, tmp_path / f"r{dp}", tensorboard=False, quantile_sample=100,
                                 quantile_every=3, device_path=dp)
        _train(model, opt, steps=7)
        probe.close()
        runs[dp] = bnn_probe.load_run(tmp_path / f"r{dp}")
    qcols = [c for c in runs[False].steps.columns if _is_quantile(c)]
    assert "abs_m_q50" in qcols and "margin_q999" in qcols
    for st in runs.values():
        has = st.steps.groupby("step")[qcols].apply(lambda d: d.notna().to_numpy().any())
        assert has[has].index.tolist() == [3, 6]
        assert st.steps["flips"].notna().all() and sorted(st.steps.step.unique()) == list(range(1, 8))
    a, b = (r.steps.sort_values(["step", "layer"]).reset_index(drop=True) for r in runs.values())
    pd.testing.assert_frame_equal(a[qcols], b[qcols], rtol=1e-12)
    assert runs[False].meta["probe"]["quantile_every"] == {"kind": "every", "n": 3}
    model, opt = multi_setup(kind)
    probe = bnn_probe.attach(model, opt, tmp_path / "default", tensorboard=False)
    _train(model, opt, steps=7)
    probe.close()
    assert bnn_probe.load_run(tmp_path / "default").steps[qcols].isna().all().all()
