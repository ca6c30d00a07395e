"""The latent network and the approximation error against hand computations; the inertia.latent_network verdict."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from bnn_probe.latent_network import approximation_error, latent_network_metrics, latent_scale, latent_weights
from bnn_probe.models import BinaryMLP
from bnn_probe.nn import BinaryLinear
from bnn_probe.reports.latent_network import analyse_latent, latent_verdicts
from bnn_probe.reports.synthetic import make_run, write_run
from bnn_probe.runlog import load_run
from bnn_probe.train import TrainConfig, train


def test_approximation_error_by_hand():
    w = torch.tensor([2.0, -1.0, 0.5, -0.5])  # α = 1: residual (1, 0, −0.5, 0.5), ‖·‖² = 1.5; ‖w‖² = 5.5
    assert latent_scale(w) == pytest.approx(1.0)
    assert approximation_error(w) == pytest.approx(math.sqrt(1.5 / 5.5))
    # closed form: sqrt(1 − mean|w|² / mean w²)
    assert approximation_error(w) == pytest.approx(math.sqrt(1 - 1.0 / (5.5 / 4)))
    assert approximation_error(torch.tensor([0.3, -0.3])) == 0.0
    assert math.isnan(approximation_error(torch.zeros(3)))


@pytest.mark.parametrize("scale", ["none", "fan_in", "mean"])
def test_latent_weights_replace_sign_by_w_over_alpha(scale):
    torch.manual_seed(0)
    layer = BinaryLinear(4, 3, scale=scale)
    x = torch.randn(5, 4)
    binary = layer(x)
    w = layer.weight.detach()
    alpha = w.abs().mean()
    c = {"none": torch.ones(3, 1), "fan_in": torch.full((3, 1), 0.5), "mean": w.abs().mean(1, keepdim=True)}[scale]
    with torch.no_grad(), latent_weights(layer):
        got = layer(x)
    assert torch.allclose(got, x @ (c * w / alpha).T, atol=1e-6)
    assert torch.equal(layer(x), binary)  # restored afterwards


def test_metrics_keys_and_recalibration_leave_the_model_alone():
    torch.manual_seed(0)
    model = BinaryMLP(6, [8], 3)
    from bnn_probe.data import Dataset

    data = Dataset("t", torch.randn(40, 6), torch.randint(0, 3, (40,)), torch.randn(20, 6),
                   torch.randint(0, 3, (20,)), 3)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))
    before = bn.running_mean.clone()
    out = latent_network_metrics(model, data)
    assert set(out) == {"approx_error/fc1.weight", "approx_error/fc2.weight", "latent_val_loss",
                        "latent_val_accuracy"}
    assert 0 <= out["latent_val_accuracy"] <= 1
    assert torch.equal(bn.running_mean, before)  # the twin, not the model, was recalibrated


def test_runner_logs_latent_network_only_for_latent_runs(tmp_path):
    cfg = TrainConfig(widths=(16,), epochs=2, batch_size=200, snapshot_every=0, hist_every=0, track=4)
    lat = load_run(train(TrainConfig(**{**cfg.__dict__, "optimizer": "latent-sgd", "latent_eval": True}),
                         tmp_path / "l", checkpoint_every=0))
    assert lat.train["latent_val_accuracy"].notna().sum() == 2
    assert {"approx_error/fc1.weight", "approx_error/fc2.weight"} <= set(lat.train.columns)
    bop = load_run(train(TrainConfig(**{**cfg.__dict__, "latent_eval": True}), tmp_path / "b", checkpoint_every=0))
    assert "latent_val_accuracy" not in bop.train and bop.meta["config"]["latent_eval"] is None  # no analogue
    off = load_run(train(TrainConfig(**{**cfg.__dict__, "optimizer": "latent-adam"}), tmp_path / "o",
                         checkpoint_every=0))  # off by default
    assert "latent_val_accuracy" not in off.train


def _synthetic(tmp_path, seed: int, gap: float, err_trend: float, name: str = "lat", lr: float = 1e-3,
               trajectory_seed: int | None = None):
    r = make_run(f"{name}-s{seed}", family="latent", n_steps=100, seed=seed, n_tracked=4,
                 trajectory_seed=trajectory_seed, config={"optimizer": "latent-adam", "seed": seed, "lr": lr})
    steps = np.arange(10, 101, 10)
    rng = np.random.default_rng(seed)
    acc = 0.9 + 0.003 * rng.standard_normal(steps.size)
    lacc = acc + gap + 0.003 * rng.standard_normal(steps.size)
    err = 0.5 + err_trend * np.linspace(0, 1, steps.size) + 0.002 * rng.standard_normal(steps.size)
    r.train = pd.DataFrame({"step": steps, "epoch": steps // 10, "val_accuracy": acc, "latent_val_accuracy": lacc,
                            "approx_error/fc1.weight": err, "approx_error/fc2.weight": err + 0.01})
    return load_run(write_run(r, tmp_path / f"{name}-{seed}"))


def test_verdict_each_outcome(tmp_path):
    # inertia view: latent network clearly worse, error does not shrink -> supported
    worse = [_synthetic(tmp_path / "w", s, gap=-0.1, err_trend=0.0) for s in range(3)]
    [v] = latent_verdicts(analyse_latent(worse)[0])
    assert v.verdict == "supported" and v.id == "inertia.latent_network" and v.n == 3
    assert v.statistic == pytest.approx(-0.1, abs=0.01)
    # approximation view: latent network as good and error shrinking -> not supported (real-valued-model case)
    approx = [_synthetic(tmp_path / "a", s, gap=0.01, err_trend=-0.2) for s in range(3)]
    [v] = latent_verdicts(analyse_latent(approx)[0])
    assert v.verdict == "not supported", v.reason
    # error grows although the latent network is as good -> supported (the error prediction fails)
    grows = [_synthetic(tmp_path / "g", s, gap=0.0, err_trend=0.2) for s in range(3)]
    [v] = latent_verdicts(analyse_latent(grows)[0])
    assert v.verdict == "supported" and "grows" in v.reason
    # as good, error flat -> inconclusive; two seeds -> inconclusive
    flat = [_synthetic(tmp_path / "f", s, gap=0.0, err_trend=0.0) for s in range(3)]
    assert latent_verdicts(analyse_latent(flat)[0])[0].verdict == "inconclusive"
    assert latent_verdicts(analyse_latent(worse[:2])[0])[0].verdict == "inconclusive"


def test_same_seed_counted_once_and_bop_skipped(tmp_path):
    runs = [_synthetic(tmp_path, 0, 0.0, 0.0, name=n) for n in ("a", "b")]
    bop = make_run("bop", family="bop", n_steps=50, n_tracked=4)
    table, curves, notes = analyse_latent([*runs, bop])
    assert len(table) == 1
    assert any("counted once" in n for n in notes) and any("no latent network" in n for n in notes)
    assert set(curves["quantity"]) == {"val_accuracy", "approx_error"}
    # another condition (lr) with the very same binary trajectory (a Theorem-1 pair) is counted once too
    twin = _synthetic(tmp_path / "t", 0, 0.0, 0.0, name="c", lr=2e-3, trajectory_seed=0)
    other = _synthetic(tmp_path / "o", 0, 0.0, 0.0, name="d", lr=2e-3, trajectory_seed=99)
    table, _, notes = analyse_latent([runs[0], twin, other])
    assert table["run"].tolist() == ["a-0", "d-0"]
