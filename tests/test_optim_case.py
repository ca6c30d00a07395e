"""CaseOptimizer: several optimizers as one torch.optim.Optimizer."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from bnn_probe.models import BinaryMLP
from bnn_probe.nn import binary_parameters
from bnn_probe.optim import Bop, Bop2ndOrder, CaseOptimizer, binary_init_, bnn_optimizer


def _model():
    model = BinaryMLP(8, [6], 3)
    binary_init_(model, seed=0)
    return model


def _real(model):
    ids = {id(p) for p in binary_parameters(model)}
    return [p for p in model.parameters() if id(p) not in ids]


def _backward(model, seed=0):
    torch.manual_seed(seed)
    model(torch.randn(16, 8)).pow(2).mean().backward()


def test_steps_every_child_like_the_children_alone():
    m1 = _model()
    m2 = copy.deepcopy(m1)
    case = CaseOptimizer(Bop(binary_parameters(m1), gamma=0.1, threshold=1e-4), torch.optim.Adam(_real(m1), lr=1e-2))
    bop, adam = Bop(binary_parameters(m2), gamma=0.1, threshold=1e-4), torch.optim.Adam(_real(m2), lr=1e-2)
    assert isinstance(case, torch.optim.Optimizer) and len(case.optimizers) == 2
    assert case.bnn_family == "bop"
    for s in range(3):
        _backward(m1, s)
        _backward(m2, s)
        case.step()
        bop.step()
        adam.step()
        case.zero_grad()
        bop.zero_grad()
        adam.zero_grad()
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q) and p.grad is None
    assert len(case.param_groups) == 2 and case.param_groups[0]["gamma"] == 0.1
    w = binary_parameters(m1)[0]
    assert torch.equal(case.state[w]["exp_avg"], case.optimizers[0].state[w]["exp_avg"])
    assert len(case.state) == len(list(m1.parameters())) and w in case.state


def test_hooks_scheduler_and_state_dict():
    model = _model()
    case = bnn_optimizer(model, gamma=0.5, threshold=1e-3, lr_real=0.25)
    calls = []
    case.register_step_pre_hook(lambda opt, a, k: calls.append("pre"))
    case.register_step_post_hook(lambda opt, a, k: calls.append("post"))
    sched = torch.optim.lr_scheduler.StepLR(case, step_size=1, gamma=0.5)
    _backward(model)
    case.step()
    sched.step()
    assert calls == ["pre", "post"]
    assert case.optimizers[0].param_groups[0]["gamma"] == 0.25  # Bop's γ, through its lr alias
    assert case.optimizers[1].param_groups[0]["lr"] == 0.125  # Adam's lr
    sd = copy.deepcopy(case.state_dict())
    other_model = copy.deepcopy(model)
    other = bnn_optimizer(other_model, gamma=0.5, threshold=1e-3, lr_real=0.25)
    other.load_state_dict(sd)
    assert other.optimizers[0].param_groups[0]["gamma"] == 0.25
    w = binary_parameters(other_model)[0]
    assert torch.equal(other.state[w]["exp_avg"], case.state[binary_parameters(model)[0]]["exp_avg"])
    with pytest.raises(ValueError, match="expected a state dict with 2"):
        other.load_state_dict({"optimizers": [sd["optimizers"][0]]})
    with pytest.raises(ValueError, match="add the group to one of"):
        case.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})


def test_claimed_twice_empty_and_not_an_optimizer():
    model = _model()
    w = binary_parameters(model)
    with pytest.raises(ValueError, match="claimed twice"):
        CaseOptimizer(Bop(w), torch.optim.Adam(model.parameters()))
    empty_group = Bop(w)
    empty_group.param_groups.append({"params": [], "gamma": 0.1, "lr": 0.1, "threshold": 0.0})
    with pytest.raises(ValueError, match="empty param group 1"):
        CaseOptimizer(empty_group)
    with pytest.raises(ValueError, match="at least one"):
        CaseOptimizer()
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer"):
        CaseOptimizer(Bop(w), "adam")


def test_from_model_predicates_and_errors():
    model = _model()
    is_bin = {id(p) for p in binary_parameters(model)}
    case = CaseOptimizer.from_model(
        model,
        (lambda n, p: id(p) in is_bin, functools.partial(Bop2ndOrder, gamma=1e-3, sigma=1e-3)),
        default=lambda ps: torch.optim.SGD(ps, lr=0.1),
    )
    assert [type(o).__name__ for o in case.optimizers] == ["Bop2ndOrder", "SGD"]
    assert case.bnn_family == "bop2nd"
    with pytest.raises(ValueError, match="'fc1.weight' is claimed twice"):
        CaseOptimizer.from_model(model, (lambda n, p: n.startswith("fc1"), Bop),
                                 (lambda n, p: n.endswith("weight"), torch.optim.Adam))
    with pytest.raises(ValueError, match="case 1 claims no parameters"):
        CaseOptimizer.from_model(model, (binary_parameters(model), Bop), (lambda n, p: False, Bop))
    with pytest.raises(ValueError, match="no case claims"):
        CaseOptimizer.from_model(model, (binary_parameters(model), Bop))
    with pytest.raises(ValueError, match="unknown binary optimizer"):
        bnn_optimizer(model, binary="sgd")
    with pytest.raises(ValueError, match="no binary parameters"):
        bnn_optimizer(torch.nn.Linear(2, 2))
    only_binary = BinaryMLP(4, [3], 2, batch_norm=False)
    assert [type(o).__name__ for o in bnn_optimizer(only_binary).optimizers] == ["Bop"]
