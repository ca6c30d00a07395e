"""The binarizer stage (probe/binarizers.py): hand checks, flat probe = per-layer reference under non-sign binarizers,
device path = CPU path, the default sign bit-identical to no binarizer, selection by module, third-party Bop keys."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _probe_helpers import MULTI_KINDS, multi_setup
from test_probe_flat import Reference, _check, _train
from torch import nn

import bnn_probe
from bnn_probe.errors import BnnProbeError
from bnn_probe.probe.binarizers import SIGN, Centered, FromFunction, Sign, as_binarizer

W = torch.tensor([[0.5, -0.25, 0.0], [-1.0, 0.0, 2.0]])


def test_sign_of_zero_variants():
    assert Sign().positive(W).tolist() == [[True, False, True], [False, True, True]]
    assert Sign(zero=-1).positive(W).tolist() == [[True, False, False], [False, False, True]]
    assert Sign(zero=0).zeros(W).tolist() == [[False, False, True], [False, True, False]]
    assert Sign().zeros(W) is None and Sign().is_default and not Sign(zero=-1).is_default
    with pytest.raises(BnnProbeError):
        Sign(zero=2)


def test_centered_hand_check():
    b = Centered(alpha=True)
    # row means 1/12 and 1/3: centred [5/12, -1/3, -1/12], [-4/3, -1/3, 5/3]
    assert b.positive(W).tolist() == [[True, False, False], [False, False, True]]
    torch.testing.assert_close(b.margin(W), torch.tensor([[5 / 12, 1 / 3, 1 / 12], [4 / 3, 1 / 3, 5 / 3]]))
    torch.testing.assert_close(b.scale(W), torch.tensor([(5 / 12 + 1 / 3 + 1 / 12) / 3, (4 / 3 + 1 / 3 + 5 / 3) / 3],
                                                        dtype=torch.float64))
    assert Centered(dim=None).positive(W).tolist() == Sign(zero=0).positive(W).tolist()


def test_from_function_and_as_binarizer():
    f = as_binarizer(lambda w: 0.1 * torch.sign(w + 0.25))
    assert isinstance(f, FromFunction) and f.keeps_zero
    assert f.positive(W).tolist() == [[True, False, True], [False, True, True]]
    assert f.zeros(W).tolist() == [[False, True, False], [False, False, False]]
    assert as_binarizer(None) is SIGN
    with pytest.raises(BnnProbeError, match="shape"):
        FromFunction(lambda w: w.sum()).positive(W)
    with pytest.raises(BnnProbeError):
        as_binarizer(3)


def _mapping(model):
    return {"w0": Centered(zero=1), "w1": Sign(zero=-1), "w2": Centered(), "w3": as_binarizer(lambda w: torch.sign(w))}


@pytest.mark.parametrize("kind", MULTI_KINDS)
def test_flat_equals_reference_with_binarizers(tmp_path, kind):
    model, opt = multi_setup(kind)
    probe = bnn_probe.attach(model, opt, tmp_path / "run", quantile_every=1,
                             tensorboard=False, quantile_sample=100, track=8,
                             events_per_layer=2000, hist_every=3, binarizer=_mapping(model))
    assert [type(ly.binarizer).__name__ for ly in probe.layers] == ["Centered", "Sign", "Centered", "FromFunction"]
    ref = Reference(probe, opt)
    _train(model, opt)
    probe.close()
    run = bnn_probe.load_run(tmp_path / "run")
    _check(run, ref)
    flips = run.steps.groupby("layer").flips.sum()
    assert flips.sum() > 0
    wf = run.weight_flips
    assert (wf.flips_per_weight * wf.n).groupby(wf.layer).sum().reindex(flips.index).tolist() == flips.tolist()


@pytest.mark.parametrize("kind", ["bop", "adam", "mixed"])
def test_device_path_equals_cpu_path_with_binarizers(tmp_path, kind):
    runs = {}
    for dp in (False, True):
        torch.manual_seed(0)
        model, opt = multi_setup(kind)
        probe = bnn_probe.attach(model, opt, tmp_path / f"run{dp}", quantile_every=1,
                                 tensorboard=False, quantile_sample=100, track=8,
                                 events_per_layer=16, hist_every=3, snapshot_every=2, binarizer=_mapping(model),
                                 device_path=dp)
        _train(model, opt)
        probe.close()
        runs[dp] = bnn_probe.load_run(tmp_path / f"run{dp}")
    a, b = runs[False], runs[True]
    cols = ["step", "layer", "flips", "c2i_diff", "sign_hash"]
    pd.testing.assert_frame_equal(a.steps[cols].reset_index(drop=True), b.steps[cols].reset_index(drop=True))
    pd.testing.assert_frame_equal(a.tracked.reset_index(drop=True), b.tracked.reset_index(drop=True))
    assert a.events.inertia_before.tolist() == pytest.approx(b.events.inertia_before.tolist(), nan_ok=True)
    assert a.snapshots.signs.map(bytes).tolist() == b.snapshots.signs.map(bytes).tolist()


def test_default_binarizer_is_bit_identical(tmp_path):
    runs = []
    for i, spec in enumerate((None, Sign(), {"w0": SIGN})):
        model, opt = multi_setup("mixed")
        probe = bnn_probe.attach(model, opt, tmp_path / f"r{i}", tensorboard=False, hist_every=3, snapshot_every=2,
                                 binarizer=spec)
        assert not any(g.any_custom for g in probe.groups)
        _train(model, opt)
        probe.close()
        runs.append(bnn_probe.load_run(tmp_path / f"r{i}"))
    for r in runs[1:]:
        for t in ("steps", "tracked", "events", "weight_flips"):
            pd.testing.assert_frame_equal(getattr(runs[0], t), getattr(r, t))


def test_binarizer_mapping_rejects_unselected_name(tmp_path):
    model, opt = multi_setup("adam")
    with pytest.raises(BnnProbeError, match="not selected"):
        bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, binarizer={"nope": SIGN})


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_predicate_with_module(tmp_path):
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False,
                             binary=lambda name, p, module: isinstance(module, nn.Conv2d) and name.endswith("weight"))
    assert [ly.name for ly in probe.layers] == ["conv.weight"]
    probe.close()
    probe = bnn_probe.attach(model, opt, tmp_path / "r2", tensorboard=False, binary=lambda n, p: n == "fc.weight")
    assert [ly.name for ly in probe.layers] == ["fc.weight"]
    probe.close()


class LarqBop(torch.optim.Optimizer):
    """larq's Bop ported to PyTorch: state key "m", hyperparameters "tau" and "g"; no ``bnn_family``."""

    def __init__(self, params, g: float = 0.3, tau: float = 0.05) -> None:
        super().__init__(params, {"g": g, "tau": tau})

    @torch.no_grad()
    def step(self, closure=None):
        for grp in self.param_groups:
            for p in grp["params"]:
                st = self.state[p]
                m = st.setdefault("m", torch.zeros_like(p))
                m.mul_(1 - grp["g"]).add_(p.grad, alpha=grp["g"])
                p.copy_(torch.where((m.abs() > grp["tau"]) & (torch.sign(m) == torch.sign(p)), -p, p))


def _bop_model():
    from _probe_helpers import Multi

    return Multi(1)


def test_third_party_bop_keys(tmp_path):
    model = _bop_model()
    opt = LarqBop(model.parameters())
    undeclared = bnn_probe.attach(model, opt, tmp_path / "r0", tensorboard=False)
    assert {ly.family for ly in undeclared.layers} == {"latent"}  # without family=, an unknown optimizer is latent
    undeclared.close()
    kinds = {(w["kind"], w["layer"]) for w in undeclared.checks.warnings}
    assert kinds == {("undeclared_bop", f"w{i}") for i in range(4)}
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, family="bop", momentum_key="m",
                             threshold_key="tau", gamma_key="g")
    assert {ly.family for ly in probe.layers} == {"bop"}
    expect = []
    g = torch.Generator().manual_seed(0)
    for t in range(1, 6):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 0.5
        opt.step()
        for name, p in model.named_parameters():
            expect.append((t, name, int((opt.state[p]["m"].abs() > 0.05).sum())))
    probe.close()
    assert probe.checks.warnings == []
    run = bnn_probe.load_run(tmp_path / "r")
    got = [(int(r.step), r.layer, int(r.above_threshold)) for r in run.steps.itertuples()]
    assert sorted(got) == sorted(expect) and sum(e[2] for e in expect) > 0
    assert run.steps.threshold.unique().tolist() == [0.05] and run.steps.gamma.unique().tolist() == [0.3]
    assert run.layers.threshold.tolist() == [0.05] * 4


def test_third_party_bop_missing_keys_raise(tmp_path):
    model = _bop_model()
    opt = LarqBop(model.parameters())
    with pytest.raises(BnnProbeError, match="threshold key 'threshold'"):
        bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, family="bop")
    with pytest.raises(BnnProbeError, match="family='bop'"):
        bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, binary=["w0"], momentum_key="m")
    probe = bnn_probe.attach(model, opt, tmp_path / "r2", tensorboard=False, family="bop", threshold_key="tau",
                             gamma_key="g")  # momentum_key left at exp_avg: wrong for this optimizer
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(BnnProbeError, match="no momentum key 'exp_avg'.*keys: m"):
        opt.step()
    probe.close("failed")


@pytest.mark.slow
def test_compiled_step_with_binarizers_equals_cpu_path(tmp_path):
    """torch.compile of the fused step with the binarizer stage's inputs (signs, margins): same log as the CPU path,
    compiled (no eager fallback)."""
    from test_probe_compiled import _no_compile_warning, _same

    runs, probes = {}, {}
    for label, opts in (("cpu", {}), ("comp", {"compile_probe": True})):
        model, opt = multi_setup("mixed")
        ctx = _no_compile_warning() if opts else None
        if ctx:
            ctx.__enter__()
        probe = bnn_probe.attach(model, opt, tmp_path / label, quantile_every=1,
                                 tensorboard=False, quantile_sample=100, track=8,
                                 events_per_layer=2000, hist_every=3, snapshot_every=4, binarizer=_mapping(model),
                                 **opts)
        _train(model, opt)
        probe.close()
        if ctx:
            ctx.__exit__(None, None, None)
        runs[label], probes[label] = bnn_probe.load_run(tmp_path / label), probe
    assert all(g.fused and g._step.compiled and g.any_custom for g in probes["comp"].groups)
    _same(runs["cpu"], runs["comp"])


def test_lightning_select_optimizer_passes_family():
    pytest.importorskip("lightning")
    from bnn_probe.integrations.lightning import select_optimizer

    model = nn.Linear(4, 3)
    adam, bop = torch.optim.Adam([model.bias], lr=0.1), LarqBop([model.weight])
    with pytest.raises(BnnProbeError, match="none of the Trainer's 2 optimizers"):
        select_optimizer(model, [adam, bop])
    assert select_optimizer(model, [adam, bop], family="bop", momentum_key="m", threshold_key="tau",
                            gamma_key="g") is bop


def test_declared_family_applies_to_the_third_party_optimizer_only(tmp_path):
    from bnn_probe.optim import CaseOptimizer

    model = _Net()
    bop = LarqBop([model.conv.weight, model.fc.weight])
    rest = [p for n, p in model.named_parameters() if n not in ("conv.weight", "fc.weight")]
    opt = CaseOptimizer(bop, torch.optim.Adam(rest, lr=0.1))
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, family="bop", momentum_key="m",
                             threshold_key="tau", gamma_key="g")
    assert [(ly.name, ly.family) for ly in probe.layers] == [("conv.weight", "bop"), ("fc.weight", "bop")]
    probe.close()
    with pytest.raises(BnnProbeError, match="every optimizer given is torch.optim's own"):
        bnn_probe.attach(model, torch.optim.Adam(model.parameters()), tmp_path / "r2", tensorboard=False,
                         family="bop")
