"""Latent-weight runs (SGD with/without clipping, Adam), foreign models named via ``binary=``, detection errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _probe_helpers import MiniBop, OneLayer, set_grad
from torch import nn

import bnn_probe
from bnn_probe.errors import BnnProbeError
from bnn_probe.models import BinaryMLP
from bnn_probe.runlog.schema import HIST_EDGES

W0 = torch.tensor([0.30, -0.05, 0.02, -0.40, 0.90, -0.013, 0.08, -0.20])  # no value lands on a bin edge
GRADS = [torch.tensor([1.0, -1.0, 0.5, -0.2, -2.0, 0.3, 1.0, 0.0]),
         torch.tensor([-1.0, 1.0, -0.5, 0.2, 2.0, -0.3, -1.0, 5.0]),
         torch.tensor([1.0, -1.0, 0.5, -0.2, -2.0, 0.3, 1.0, 0.0])]
LR = 0.1


def _clip_hook(opt, clip):
    def hook(optimizer, args, kwargs):
        with torch.no_grad():
            for g in optimizer.param_groups:
                for p in g["params"]:
                    p.clamp_(-clip, clip)
    opt.register_step_post_hook(hook)
    opt.bnn_clip_value = clip


@pytest.mark.parametrize("clip", [None, 0.25])
def test_latent_sgd_quantities(tmp_path, clip):
    model = OneLayer(W0)
    opt = torch.optim.SGD([model.w], lr=LR)
    if clip is not None:
        _clip_hook(opt, clip)
    with bnn_probe.attach(model, opt, tmp_path / "run", quantile_every=1,
                          tensorboard=False, events_per_layer=50, track=50,
                          hist_every=1) as probe:
        for g in GRADS:
            set_grad(model, g)
            opt.step()
        probe.log(loss=1.5, acc=0.25)
        probe.log(epoch=0, val_loss=2.0)
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.layers.family[0] == "latent" and run.layers.lr[0] == LR
    w, w0 = W0.clone(), W0.clone()
    count, last = np.zeros(8, int), np.zeros(8, int)
    for t, g in enumerate(GRADS, start=1):
        w_prev = w.clone()
        w = w - LR * g
        if clip is not None:
            w = w.clamp(-clip, clip)
        fl = ((w >= 0) != (w_prev >= 0)).numpy()
        got = run.steps[run.steps.step == t].iloc[0]
        assert got.flips == fl.sum() and got.flip_ratio == fl.sum() / 8
        assert got.c2i == pytest.approx(1 - ((w >= 0) != (w0 >= 0)).sum().item() / 8)
        assert got.abs_w_mean == pytest.approx(w.abs().mean().item(), rel=1e-6)
        for q in (5, 25, 50, 75, 95):
            assert got[f"abs_w_q{q:02d}"] == pytest.approx(np.quantile(w.abs().double().numpy(), q / 100), rel=1e-5)
        if clip is None:
            assert np.isnan(got.at_clip)
        else:
            assert got.at_clip == int((w.abs() >= clip).sum())
        assert got.lr == LR and np.isnan(got.gamma) and np.isnan(got.adam_step_q50)
        assert np.isnan(got.margin_exceed_1) and np.isnan(got.margin_q50)
        assert got.c2i_corr == pytest.approx(2 * got.c2i - 1)
        ev = run.events[run.events.step == t].sort_values("index")
        idx = np.nonzero(fl)[0]
        assert ev["index"].tolist() == idx.tolist()
        assert ev.inertia_before.tolist() == pytest.approx(w_prev.abs()[idx].tolist(), rel=1e-6)
        step = (w - w_prev).abs()  # step_size of the latent state: |w̃_t − w̃_{t−1}| (0 where clipped in place)
        assert ev.step_size.tolist() == pytest.approx(step[idx].tolist(), rel=1e-5, abs=1e-9)
        assert (ev.inertia_before <= ev.step_size * (1 + 1e-6)).all()  # |w̃_{t−1}| ≤ |w̃_t − w̃_{t−1}| at a crossing
        since = [pd.NA if last[i] == 0 else t - last[i] for i in idx]
        assert [pd.NA if pd.isna(x) else x for x in ev.steps_since_last_flip] == since
        tr = run.tracked[run.tracked.step == t].sort_values("index")
        assert tr.inertia.tolist() == pytest.approx(w.abs().tolist(), rel=1e-6)
        assert tr.step_size.tolist() == pytest.approx(step.tolist(), rel=1e-5, abs=1e-9)
        assert tr.sign.tolist() == [1 if x >= 0 else -1 for x in w.tolist()]
        h = run.hists[(run.hists.step == t) & (run.hists.quantity == "abs_w")]
        expect = np.bincount(np.searchsorted(HIST_EDGES["abs_w"], w.abs().double().numpy(), side="right"),
                             minlength=len(HIST_EDGES["abs_w"]) + 1)
        assert dict(zip(h.bin, h["count"], strict=True)) == {b: c for b, c in enumerate(expect) if c}
        count += fl
        last[fl] = t
    assert count.sum() > 0 and (count >= 2).any()  # a weight flipped back: steps_since_last_flip was tested
    wf = run.weight_flips
    assert dict(zip(wf.flips_per_weight, wf.n, strict=True)) == {k: int((count == k).sum()) for k in np.unique(count)}
    train = run.train
    assert list(train.columns[:2]) == ["step", "epoch"]
    assert len(train) == 2  # (step 3, no epoch) and (step 3, epoch 0): step defaults to the probe's step
    row = train[train.epoch.isna()].iloc[0]
    assert (row.step, row.loss, row.acc) == (3, 1.5, 0.25) and pd.isna(row.val_loss)
    assert train.loss.dtype == np.float64
    assert train[train.epoch == 0].val_loss.iloc[0] == 2.0


def test_nonfinite_grads_counted(tmp_path):
    model = OneLayer(W0)
    opt = torch.optim.SGD([model.w], lr=LR)
    with bnn_probe.attach(model, opt, tmp_path / "run", quantile_every=1, tensorboard=False):
        set_grad(model, torch.tensor([np.nan, np.inf, -np.inf, 0, 0, 0, 0, 1.0]))
        opt.step()
    assert bnn_probe.load_run(tmp_path / "run").steps.nonfinite_grads.tolist() == [3]


def test_adam_normalised_step(tmp_path):
    model = OneLayer(W0)
    opt = torch.optim.Adam([model.w], lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    with bnn_probe.attach(model, opt, tmp_path / "run", quantile_every=1, tensorboard=False):
        for g in GRADS:
            set_grad(model, g)
            opt.step()
    steps = bnn_probe.load_run(tmp_path / "run").steps
    m = torch.zeros(8, dtype=torch.float64)
    v = torch.zeros(8, dtype=torch.float64)
    for t, g in enumerate(GRADS, start=1):
        g = g.double()
        m = 0.9 * m + 0.1 * g
        v = 0.99 * v + 0.01 * g * g
        u = ((m / (1 - 0.9**t)) / ((v / (1 - 0.99**t)).sqrt() + 1e-8)).abs().numpy()
        got = steps[steps.step == t].iloc[0]
        assert got.adam_step_q50 == pytest.approx(np.quantile(u, 0.5), rel=1e-4)
        assert got.adam_step_q95 == pytest.approx(np.quantile(u, 0.95), rel=1e-4)


class _MySign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.where(x >= 0, 1.0, -1.0)

    @staticmethod
    def backward(ctx, g):
        return g


class Foreign(nn.Module):
    """A model bnn_probe did not write: its own sign function and parameter names."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Module()
        self.enc.kernel = nn.Parameter(torch.randn(6, 5))
        self.head_kernel = nn.Parameter(torch.randn(3, 6))
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        h = x @ _MySign.apply(self.enc.kernel).t() * self.scale
        return _MySign.apply(h) @ _MySign.apply(self.head_kernel).t()


@pytest.mark.parametrize("spec", [["enc.kernel", "head_kernel"], lambda n, p: "kernel" in n])
def test_foreign_model_named_binary(tmp_path, spec):
    model = Foreign()
    bin_params = [model.enc.kernel, model.head_kernel]
    opt_bin = MiniBop(bin_params, gamma=0.1, threshold=0.0)
    for p in bin_params:
        p.data = torch.where(p.data >= 0, 1.0, -1.0)
    opt_real = torch.optim.Adam([model.scale], lr=0.01)
    with pytest.raises(BnnProbeError, match="no binary parameters"):
        bnn_probe.attach(model, opt_real, tmp_path / "x")
    with pytest.raises(BnnProbeError, match="not stepped"):
        bnn_probe.attach(model, opt_real, tmp_path / "x", binary=["enc.kernel"])
    with pytest.raises(BnnProbeError, match="not in model"):
        bnn_probe.attach(model, opt_bin, tmp_path / "x", binary=["enc.weight"])
    with bnn_probe.attach(model, opt_bin, tmp_path / "run", binary=spec, tensorboard=False):
        for _ in range(3):
            loss = model(torch.randn(4, 5)).pow(2).mean()
            opt_bin.zero_grad()
            opt_real.zero_grad()
            loss.backward()
            opt_bin.step()
            opt_real.step()
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.layers.layer.tolist() == ["head_kernel", "enc.kernel"]  # model.named_parameters() order
    assert run.layers.fan_in.tolist() == [6, 5] and run.layers.fan_out.tolist() == [3, 6]
    assert len(run.steps) == 6 and run.steps.flips.sum() > 0  # τ = 0: Bop flips readily


def test_autodetect_bnn_layers_and_bop_groups(tmp_path):
    model = BinaryMLP(8, [4], 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = bnn_probe.attach(model, opt, tmp_path / "a", tensorboard=False)
    assert [ly.name for ly in probe.layers] == ["fc1.weight", "fc2.weight"]
    probe.close()
    plain = nn.Linear(3, 2)
    bop = MiniBop([plain.weight])
    probe = bnn_probe.attach(plain, bop, tmp_path / "b", tensorboard=False)
    assert [(ly.name, ly.family) for ly in probe.layers] == [("weight", "bop")]
    probe.close()
    with pytest.raises(BnnProbeError, match="already holds a run"):
        bnn_probe.attach(plain, bop, tmp_path / "b", tensorboard=False)
