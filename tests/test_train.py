"""The reference training loop: determinism, logged metrics, stored config, optimizers, pairs, bad input."""

import json
from dataclasses import replace

import pytest
import torch

import bnn_probe
from bnn_probe.errors import BnnProbeError
from bnn_probe.nn import binary_parameters
from bnn_probe.train import (
    DecoupledSGD,
    StepDecay,
    TrainConfig,
    build_optimizer,
    parse_widths,
    prepare_out_dir,
    run_epoch,
    setup,
    train,
)

# 1437 digits at batch 100: 15 steps per epoch; a tiny MLP keeps every run well under a second.
TINY = dict(widths=(32,), batch_size=100, epochs=1, hist_every=5, snapshot_every=5, track=8)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def _train_state(cfg, out):
    state = setup(cfg, out)
    while state.epoch < state.config.epochs:
        run_epoch(state)
    state.probe.close()
    return state


def _signs(model):
    return [p.detach() >= 0 for p in binary_parameters(model)]


@pytest.mark.parametrize("optimizer", ["bop", "latent-adam"])
def test_same_seed_same_options_identical_weights_and_logs(tmp_path, optimizer):
    cfg = _cfg(optimizer=optimizer, epochs=2, gamma=1e-3 if optimizer == "bop" else None)
    a = _train_state(cfg, tmp_path / "a")
    b = _train_state(cfg, tmp_path / "b")
    for wa, wb in zip(binary_parameters(a.model), binary_parameters(b.model), strict=True):
        assert torch.equal(wa, wb)
    ra, rb = bnn_probe.load_run(tmp_path / "a"), bnn_probe.load_run(tmp_path / "b")
    assert ra.train.drop(columns=["wall_seconds"], errors="ignore").equals(
        rb.train.drop(columns=["wall_seconds"], errors="ignore"))
    cols = ["step", "layer", "flips", "sign_hash"]
    assert ra.steps[cols].equals(rb.steps[cols])
    c = _train_state(replace(cfg, seed=1), tmp_path / "c")
    assert any(not torch.equal(x, y) for x, y in zip(_signs(a.model), _signs(c.model), strict=True))


def test_logs_per_step_loss_and_per_epoch_metrics_and_config(tmp_path):
    cfg = _cfg(optimizer="bop", epochs=2, tag="hello", pair="p1", pair_role="a")
    path = train(cfg, tmp_path / "run", progress=False)
    run = bnn_probe.load_run(path)
    assert run.status == "finished"
    tr = run.train
    per_step = tr.dropna(subset=["train_loss"])
    assert per_step["step"].tolist() == list(range(1, 31))
    per_epoch = tr.dropna(subset=["val_accuracy"])
    assert per_epoch["epoch"].tolist() == [1, 2] and per_epoch["step"].tolist() == [15, 30]
    for col in ("train_loss_epoch", "train_accuracy", "val_loss", "val_accuracy", "gamma", "lr_real"):
        assert per_epoch[col].notna().all(), col
    assert 0.0 <= per_epoch["val_accuracy"].iloc[-1] <= 1.0
    meta = json.loads((path / "meta.json").read_text())
    assert meta["config"] == cfg.resolved().to_dict()
    assert meta["config"]["pair"] == "p1" and meta["config"]["pair_role"] == "a"
    assert meta["tag"] == "hello" and meta["family"] == "bop"
    assert meta["config"]["lr"] is None and meta["config"]["gamma"] == 1e-4  # resolved: paper default


def test_training_learns_digits(tmp_path):
    path = train(_cfg(optimizer="bop", gamma=1e-3, threshold=1e-6, widths=(64,), epochs=3), tmp_path / "r",
                 progress=False)
    acc = bnn_probe.load_run(path).train["val_accuracy"].dropna()
    assert acc.iloc[-1] > 0.7


def test_resolved_defaults_depend_on_optimizer():
    bop = TrainConfig().resolved()
    assert (bop.gamma, bop.threshold, bop.lr, bop.clip, bop.sigma) == (1e-4, 1e-8, None, None, None)
    adam = TrainConfig(optimizer="latent-adam").resolved()
    assert (adam.gamma, adam.threshold, adam.lr, adam.clip, adam.glorot_lr) == (None, None, 1e-3, True, True)
    sgd = TrainConfig(optimizer="latent-sgd").resolved()
    assert (sgd.lr, sgd.momentum, sgd.decoupled_decay) == (0.1, 0.0, 0.0)
    assert TrainConfig(optimizer="bop2nd").resolved().sigma == 1e-4
    assert TrainConfig(model="cnn1d").resolved().widths == ()
    assert TrainConfig.from_dict(adam.to_dict()) == adam


@pytest.mark.parametrize("kw, match", [
    (dict(model="resnet"), "unknown model 'resnet'"),
    (dict(widths="2048,x"), "--widths must be comma-separated"),
    (dict(epochs=-1), "--epochs must be a non-negative integer"),
    (dict(optimizer="sgd"), "unknown optimizer"),
    (dict(dataset="mnist"), "unknown dataset"),
    (dict(ste="tanh"), "unknown STE"),
    (dict(gamma=2.0), "--gamma must be at most 1"),
    (dict(threshold=-1.0), "--threshold must be a non-negative"),
    (dict(batch_size=1), "--batch-size"),
    (dict(pair_role="c"), "pair_role"),
])
def test_bad_options_are_one_line_errors(kw, match):
    with pytest.raises(BnnProbeError, match=match) as e:
        TrainConfig(**kw).resolved()
    assert "\n" not in str(e.value)


def test_parse_widths():
    assert parse_widths("2048,64,1024") == (2048, 64, 1024)
    for bad in ("", "a,b", "3,-1", "0"):
        with pytest.raises(BnnProbeError):
            parse_widths(bad)


def test_out_dir_never_overwritten_silently(tmp_path):
    out = tmp_path / "run"
    train(_cfg(hist_every=0), out, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(_cfg(hist_every=0), out, progress=False)
    train(_cfg(hist_every=0, seed=3), out, progress=False, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["config"]["seed"] == 3
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no run"):
        prepare_out_dir(other, overwrite=True)
    assert (other / "notes.txt").exists()
    assert prepare_out_dir(tmp_path / "empty") == tmp_path / "empty"


def test_build_optimizer_groups_families_and_clipping():
    from bnn_probe.models import BinaryMLP

    model = BinaryMLP(64, [32, 16], 10)
    opt = build_optimizer(model, TrainConfig(optimizer="bop", gamma=1e-3, threshold=1e-6).resolved())
    assert opt.bnn_family == "bop"
    bop, adam = opt.optimizers
    assert [g["layer"] for g in bop.param_groups] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert all(g["gamma"] == 1e-3 and g["threshold"] == 1e-6 for g in bop.param_groups)
    assert adam.param_groups[0]["lr"] == 1e-2
    opt2 = build_optimizer(model, TrainConfig(optimizer="bop2nd", sigma=1e-3).resolved())
    assert opt2.bnn_family == "bop2nd" and opt2.optimizers[0].param_groups[0]["sigma"] == 1e-3
    lat = build_optimizer(model, TrainConfig(optimizer="latent-adam").resolved())
    assert lat.bnn_family == "latent" and lat.bnn_clip_value == 1.0
    g0 = lat.optimizers[0].param_groups[0]
    assert g0["lr"] == pytest.approx(1e-3 / (1.5 / (64 + 32)) ** 0.5)
    sgd = build_optimizer(model, TrainConfig(optimizer="latent-sgd", clip=False, glorot_lr=False).resolved())
    assert isinstance(sgd.optimizers[0], DecoupledSGD) and sgd.bnn_clip_value is None
    assert sgd.optimizers[0].param_groups[0]["lr"] == 0.1


def test_threshold_policy_seam():
    from bnn_probe.models import BinaryMLP
    from bnn_probe.optim import thresholds

    model = BinaryMLP(64, [256, 16], 10)
    policy = thresholds.fan_in(1e-6, reference_fan_in=64)
    opt = build_optimizer(model, TrainConfig(optimizer="bop").resolved(), policy=policy)
    taus = [g["threshold"] for g in opt.optimizers[0].param_groups]
    assert taus == pytest.approx([1e-6, 5e-7, 2e-6])


def test_step_decay_drives_gamma_and_lrs():
    from bnn_probe.models import BinaryMLP

    model = BinaryMLP(8, [4], 2)
    opt = build_optimizer(model, TrainConfig(optimizer="bop", gamma=1e-3).resolved())
    sched = StepDecay(opt, every=2, factor=0.1)
    sched.apply(1)
    assert opt.optimizers[0].param_groups[0]["gamma"] == pytest.approx(1e-3)
    sched.apply(2)
    assert opt.optimizers[0].param_groups[0]["gamma"] == pytest.approx(1e-4)
    assert opt.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-3)
    sched.apply(5)
    assert opt.optimizers[0].param_groups[0]["gamma"] == pytest.approx(1e-5)


def test_decoupled_sgd_update():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    w.grad = torch.tensor([0.5, 0.5])
    DecoupledSGD([w], lr=0.25, decoupled_decay=1.0).step()
    assert w.detach().tolist() == [0.75 * 1.0 - 0.25 * 0.5, 0.75 * -2.0 - 0.25 * 0.5]


def test_all_optimizers_start_from_the_same_signs(tmp_path):
    from bnn_probe.models import BinaryMLP
    from bnn_probe.train import init_binary_weights

    signs = []
    for opt in ("bop", "latent-adam", "latent-sgd"):
        model = BinaryMLP(64, [32], 10)
        init_binary_weights(model, TrainConfig(optimizer=opt, seed=5).resolved())
        signs.append(_signs(model))
        if opt != "bop":
            bound = (6 / (64 + 32)) ** 0.5
            w = binary_parameters(model)[0]
            assert 0 < w.abs().min() and w.abs().max() <= bound
    assert all(torch.equal(a, b) for s in signs[1:] for a, b in zip(signs[0], s, strict=True))


def _hashes(path):
    return bnn_probe.load_run(path).steps[["step", "layer", "sign_hash"]].reset_index(drop=True)


def test_theorem1_and_tau0_pairs_have_identical_binary_trajectories(tmp_path):
    from bnn_probe.studies import StudyOptions, plan_study

    specs = {s.name: s.config for s in plan_study("inertia", StudyOptions(epochs=1, widths=(32,)))}
    # the power-of-two Theorem-1 pair is a code test (the study scales by C = 3, 10, 100 instead)
    ref = replace(specs["theorem1-unclipped-c1-s0"], extra={})
    specs["theorem1-a-s0"] = ref
    specs["theorem1-b-s0"] = replace(ref, lr=32 * ref.lr, init_scale=32 * ref.init_scale)
    for name in ("theorem1-a-s0", "theorem1-b-s0", "tau0-bop-s0", "tau0-latent-sgd-s0"):
        train(replace(specs[name], batch_size=100, hist_every=0), tmp_path / name, progress=False)
    a, b = _hashes(tmp_path / "theorem1-a-s0"), _hashes(tmp_path / "theorem1-b-s0")
    assert len(a) == 15 * 2 and a.equals(b)
    a, b = _hashes(tmp_path / "tau0-bop-s0"), _hashes(tmp_path / "tau0-latent-sgd-s0")
    assert len(a) == 15 * 2 and a.equals(b)
    flips = bnn_probe.load_run(tmp_path / "tau0-bop-s0").steps["flips"].sum()
    assert flips > 0  # the trajectories are not trivially constant


@pytest.mark.parametrize("model, kw", [("binarynet", dict(width_multiplier=0.0625)), ("cnn1d", {})])
def test_other_models_train_on_digits(tmp_path, model, kw):
    path = train(_cfg(model=model, batch_size=500, hist_every=0, **kw), tmp_path / model, progress=False)
    assert bnn_probe.load_run(path).status == "finished"


def test_failed_run_is_marked_failed(tmp_path, monkeypatch):
    import bnn_probe.train as t

    def boom(state, bar=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(t, "run_epoch", boom)
    with pytest.raises(RuntimeError):
        train(_cfg(), tmp_path / "r", progress=False)
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["status"] == "failed"


def test_latent_init_glorot_and_uniform1_bounds_and_same_signs():
    """--latent-init glorot draws |w̃_0| ≤ sqrt(6/(fan_in+fan_out)); uniform1 (BinaryNet) ≤ 1 and reaches far above the
    Glorot bound; both keep the seed's signs; --init-scale overrides either; Bop runs store no latent_init."""
    from bnn_probe.models import BinaryMLP
    from bnn_probe.train import init_binary_weights

    ws = {}
    for init in ("glorot", "uniform1"):
        model = BinaryMLP(64, [32], 10)
        init_binary_weights(model, TrainConfig(optimizer="latent-adam", latent_init=init, seed=5).resolved())
        ws[init] = binary_parameters(model)[0].detach().clone()
    bound = (6 / (64 + 32)) ** 0.5
    assert ws["glorot"].abs().max() <= bound
    assert ws["uniform1"].abs().max() <= 1.0 and ws["uniform1"].abs().max() > 0.9
    assert torch.equal(ws["glorot"].sign(), ws["uniform1"].sign())
    # same uniform draw u, scaled by the bound: uniform1 = glorot / bound
    assert torch.allclose(ws["uniform1"], ws["glorot"] / bound, rtol=1e-6)
    model = BinaryMLP(64, [32], 10)
    init_binary_weights(model, TrainConfig(optimizer="latent-sgd", latent_init="uniform1", init_scale=0.01).resolved())
    assert binary_parameters(model)[0].abs().max() <= 0.01
    assert TrainConfig(optimizer="bop").resolved().latent_init is None
    with pytest.raises(BnnProbeError, match="--latent-init"):
        TrainConfig(optimizer="latent-adam", latent_init="xavier").resolved()
