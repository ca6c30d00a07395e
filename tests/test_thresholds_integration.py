"""Threshold policies with the real Bop/Bop2ndOrder and the probe: the τ trajectory of the calibrated controller
is what the run log's steps table records, and the policy lands in the run's config."""

from __future__ import annotations

import pytest
import torch

import bnn_probe
from bnn_probe.models import BinaryMLP
from bnn_probe.nn import named_binary_parameters
from bnn_probe.optim import Bop, Bop2ndOrder, CaseOptimizer, binary_init_
from bnn_probe.optim import thresholds as T


def _train(model, opt, steps):
    x = torch.randn(128, 16)
    y = x[:, :4].argmax(1)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_calibrated_trajectory_is_logged_by_the_probe(tmp_path):
    model = BinaryMLP(16, [64, 8], 4)
    binary_init_(model, seed=0)
    pol = T.calibrated(0.01, initial_threshold=1e-6, every=5, min_flips=10)
    opt = Bop(pol.param_groups(named_binary_parameters(model), gamma=1e-2))
    probe = bnn_probe.attach(model, opt, tmp_path / "run", config={"threshold_policy": pol.describe()},
                             tensorboard=False)
    ctl = pol.attach(opt)  # hooked after the probe; the order does not matter (updates apply at the next step)
    _train(model, opt, 80)
    probe.close()
    run = bnn_probe.load_run(tmp_path / "run")
    assert run.meta["config"]["threshold_policy"]["name"] == "calibrated"
    logged = run.steps.pivot(index="step", columns="layer", values="threshold")
    assert len(ctl.history) > 3
    for s, taus in ctl.history[1:]:  # decided at step s, in force (and logged) from step s + 1
        if s + 1 in logged.index:
            for layer, tau in taus.items():
                assert logged.loc[s + 1, layer] == pytest.approx(tau, rel=1e-12)
    assert logged["fc1.weight"].nunique() > 3  # the trajectory moved


def test_fan_in_groups_work_with_bop2nd():
    model = BinaryMLP(16, [64, 8], 4)
    binary_init_(model, seed=0)
    groups = T.fan_in(1e-3, reference_fan_in=16).param_groups(named_binary_parameters(model), gamma=1e-2)
    opt = Bop2ndOrder(groups)
    # fan-ins 16, 64, 8: τ = 1e-3 · (16/n)^0.5
    assert [g["threshold"] for g in opt.param_groups] == pytest.approx([1e-3, 0.5e-3, 1e-3 * 2**0.5])
    _train(model, opt, 3)


def test_controller_inside_case_optimizer_counts_each_step_once():
    model = BinaryMLP(16, [64, 8], 4)
    binary_init_(model, seed=0)
    pol = T.calibrated(0.05, initial_threshold=1e-6, every=1, min_flips=1)
    real = [p for n, p in model.named_parameters() if not n.endswith(".weight") or n.startswith("bn")]
    opt = CaseOptimizer(Bop(pol.param_groups(named_binary_parameters(model), gamma=1e-2)),
                        torch.optim.Adam(real, lr=1e-2))
    ctl = pol.attach(opt)
    _train(model, opt, 7)
    assert ctl.step_count == 7 and len(ctl.history) > 1


def test_controller_follows_groups_replaced_by_load_state_dict():
    model = BinaryMLP(16, [64, 8], 4)
    binary_init_(model, seed=0)
    pol = T.calibrated(0.05, initial_threshold=1e-6, every=1, min_flips=1)
    opt = Bop(pol.param_groups(named_binary_parameters(model), gamma=1e-2))
    ctl = pol.attach(opt)
    _train(model, opt, 3)
    opt.load_state_dict(opt.state_dict())  # torch builds new param-group dicts here (as a resumed run does)
    before = [g["threshold"] for g in opt.param_groups]
    _train(model, opt, 3)
    assert [g["threshold"] for g in opt.param_groups] != before  # the controller still steers the live groups
    assert ctl.thresholds() == {g["layer"]: g["threshold"] for g in opt.param_groups}
