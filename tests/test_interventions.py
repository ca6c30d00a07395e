"""reset_inertia against hand computations, the runner's intervention pairs, and the magnitude-reset verdict."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from torch import nn

import bnn_probe
from bnn_probe.errors import BnnProbeError
from bnn_probe.interventions import reset_inertia
from bnn_probe.models import BinaryMLP
from bnn_probe.optim import Bop, Bop2ndOrder, CaseOptimizer
from bnn_probe.reports.interventions import analyse_resets, final_value, reset_verdicts, t_interval
from bnn_probe.reports.synthetic import make_run, write_run
from bnn_probe.runlog import load_run
from bnn_probe.train import TrainConfig, train


def _signs(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1, -1)


def _latent(values) -> tuple[nn.Parameter, torch.optim.Optimizer]:
    w = nn.Parameter(torch.tensor(values))
    bnn_probe.nn.mark_binary(w)
    return w, torch.optim.Adam([w], lr=1e-3)


def test_latent_constant_is_the_layer_mean_with_signs_kept():
    w, opt = _latent([0.5, -0.1, 0.3, -0.9])
    n = reset_inertia(opt, mode="constant")
    assert n == 4
    assert torch.allclose(w.data, torch.tensor([0.45, -0.45, 0.45, -0.45]))


def test_latent_shuffle_permutes_magnitudes_keeps_signs_and_is_seeded():
    vals = [0.5, -0.1, 0.3, -0.9, 0.05, -0.7]
    w, opt = _latent(vals)
    reset_inertia(opt, mode="shuffle", seed=3)
    assert torch.equal(_signs(w.data), _signs(torch.tensor(vals)))
    assert sorted(w.data.abs().tolist()) == pytest.approx(sorted(abs(v) for v in vals))
    w2, opt2 = _latent(vals)
    reset_inertia(opt2, mode="shuffle", seed=3)
    assert torch.equal(w.data, w2.data)


def test_latent_zero_magnitude_never_changes_a_sign():
    w, opt = _latent([0.0, -0.5])
    for seed in range(8):  # whichever weight receives the 0 magnitude keeps its sign
        reset_inertia(opt, mode="shuffle", seed=seed)
        assert _signs(w.data).tolist() == [1, -1]


def test_adam_state_is_left_alone():
    model = BinaryMLP(6, [5], 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 6)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in opt.state[model[1].weight].items()}
    reset_inertia(opt)
    for k, v in opt.state[model[1].weight].items():
        assert torch.equal(v, before[k])


def _bop_after_a_step(cls=Bop):
    torch.manual_seed(0)
    model = BinaryMLP(6, [5], 3)
    bnn_probe.optim.binary_init_(model, seed=0)
    params = bnn_probe.nn.binary_parameters(model)
    kw = {"sigma": 1e-2} if cls is Bop2ndOrder else {}
    bop = cls(params, gamma=1e-1, threshold=1e9, **kw)  # τ huge: no flips, m ≠ 0
    rest = [p for p in model.parameters() if all(p is not q for q in params)]
    opt = CaseOptimizer(bop, torch.optim.Adam(rest, lr=1e-2))
    F.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    return model, opt, bop, params


@pytest.mark.parametrize("mode", ["zero", "constant", "shuffle"])
def test_bop_modes_on_m(mode):
    model, opt, bop, params = _bop_after_a_step()
    w0 = [p.detach().clone() for p in params]
    m0 = [bop.state[p]["exp_avg"].clone() for p in params]
    n = reset_inertia(opt, mode=mode, seed=1)
    for p, w, m in zip(params, w0, m0, strict=True):
        assert torch.equal(p.data, w)  # the binary weights are not touched
        m1 = bop.state[p]["exp_avg"]
        if mode == "zero":
            assert torch.equal(m1, torch.zeros_like(m))
        else:
            assert torch.equal(torch.sign(m1), torch.sign(m))  # sign of m and hence of w·m kept
            if mode == "constant":
                assert torch.allclose(m1.abs(), m.abs().mean().expand_as(m))
            else:
                assert torch.allclose(m1.abs().flatten().sort().values, m.abs().flatten().sort().values)
    assert n == sum(int((bop.state[p]["exp_avg"] != m).sum()) for p, m in zip(params, m0, strict=True))
    assert n > 0


def test_bop2nd_keeps_v():
    model, opt, bop, params = _bop_after_a_step(Bop2ndOrder)
    v0 = [bop.state[p]["exp_avg_sq"].clone() for p in params]
    reset_inertia(opt, mode="zero")
    for p, v in zip(params, v0, strict=True):
        assert torch.equal(bop.state[p]["exp_avg_sq"], v)
        assert not bop.state[p]["exp_avg"].any()


def test_bad_modes_and_params():
    w, opt = _latent([0.5, -0.1])
    with pytest.raises(BnnProbeError, match="Bop-family"):
        reset_inertia(opt, mode="zero")
    with pytest.raises(BnnProbeError, match="unknown reset mode"):
        reset_inertia(opt, mode="halve")
    with pytest.raises(BnnProbeError, match="not stepped"):
        reset_inertia(opt, params=[nn.Parameter(torch.ones(2))])
    plain = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(BnnProbeError, match="no binary parameter"):
        reset_inertia(plain)


def test_probe_records_the_reset(tmp_path):
    model = BinaryMLP(6, [5], 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 6)).sum().backward()
        opt.step()
    n = reset_inertia(opt, mode="shuffle", seed=5)
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())  # written at once, before close
    assert meta["interventions"] == [{"step": 3, "kind": "reset_inertia", "mode": "shuffle", "seed": 5,
                                      "n_changed": n}]
    probe.close()
    assert load_run(tmp_path / "r").meta["interventions"][0]["step"] == 3


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(widths=(16,), epochs=2, batch_size=100, snapshot_every=0, hist_every=0, track=4, **kw)


@pytest.mark.parametrize("optimizer,mode", [("latent-adam", "constant"), ("bop", "zero")])
def test_runner_arms_are_identical_until_t(tmp_path, optimizer, mode):
    t = 7
    runs = {}
    for role in ("control", "reset"):
        iv = {"pair": "p", "role": role, "step": t, "mode": mode}
        cfg = _cfg(optimizer=optimizer, gamma=1e-3 if optimizer == "bop" else None,
                   threshold=1e-6 if optimizer == "bop" else None, intervention=iv)
        runs[role] = load_run(train(cfg, tmp_path / role, checkpoint_every=0))
    c, r = runs["control"], runs["reset"]
    m = c.steps.merge(r.steps, on=["step", "layer"], suffixes=("_c", "_r"))
    same = m["sign_hash_c"] == m["sign_hash_r"]
    assert same[m["step"] <= t].all()  # deterministic training: one trajectory until T (and at T)
    assert not same[m["step"] > t].all()  # the reset changed what happened next
    assert c.meta["interventions"][0]["kind"] == "control" and c.meta["interventions"][0]["step"] == t
    assert r.meta["interventions"][0]["kind"] == "reset_inertia" and r.meta["interventions"][0]["n_changed"] > 0
    assert r.meta["config"]["intervention"] == {"pair": "p", "role": "reset", "step": t, "mode": mode}


def test_cli_options_and_bad_input(tmp_path, capsys):
    common = ["train", "--widths", "16", "--epochs", "1", "--batch-size", "200", "--snapshot-every", "0",
              "--hist-every", "0"]
    code, _, err = run_cli([*common, "--optimizer", "latent-adam", "--reset-inertia-mode", "zero",
                            "--reset-inertia-step", "3", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "must be one of constant, shuffle" in err
    code, _, err = run_cli([*common, "--reset-inertia-step", "0", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "positive optimizer step" in err
    code, _, err = run_cli([*common, "--reset-inertia-step", "3", "--intervention-role", "treated",
                            "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "control or reset" in err
    code, _, err = run_cli([*common, "--reset-inertia-step", "8", "--out", str(tmp_path / "f")], capsys)
    assert code == 2 and "not before the run's last step (8 = 1 epochs × 8 steps)" in err
    code, _, err = run_cli([*common, "--intervention-role", "control", "--out", str(tmp_path / "e")], capsys)
    assert code == 2 and "need(s) --reset-inertia-step" in err
    code, _, err = run_cli([*common, "--optimizer", "bop", "--reset-inertia-step", "3", "--reset-inertia-mode",
                            "shuffle", "--out", str(tmp_path / "d")], capsys)
    assert code == 0, err
    iv = load_run(tmp_path / "d").meta["config"]["intervention"]
    assert iv == {"pair": "digits-mlp-bop-shuffle-T3-s0", "role": "reset", "step": 3, "mode": "shuffle"}


# ---------------------------------------------------------------------------------------------------------------
# the verdict


def test_final_value_and_t_interval():
    tr = pd.DataFrame({"step": [10, 20, 30, 40, 50], "val_accuracy": [0.1, 0.2, 0.3, 0.4, np.nan]})
    assert final_value(tr, "val_accuracy", k=2) == pytest.approx(0.35)
    assert final_value(tr, "val_accuracy", after=25, k=3) == pytest.approx(0.35)
    assert np.isnan(final_value(tr, "val_accuracy", after=45))
    m, lo, hi, n = t_interval([1.0, 2.0, 3.0], 0.95)  # mean 2, se 1/√3, t(0.975, 2) = 4.3027
    assert (m, n) == (2.0, 3)
    assert hi - m == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)


def _synthetic_pair(tmp_path, seed: int, acc_gap: float, burst: float, t: int = 100, mode: str = "constant"):
    """A control and a reset run, identical until t; after t the reset arm flips ``burst`` more per step for 20
    steps and ends ``acc_gap`` below the control."""
    runs = []
    for role in ("control", "reset"):
        iv = {"pair": f"syn-s{seed}", "role": role, "step": t, "mode": mode}
        r = make_run(f"{role}-s{seed}", family="latent", n_steps=200, seed=seed, n_tracked=4,
                     config={"optimizer": "latent-adam", "seed": seed, "intervention": iv})
        if role == "reset":
            bump = (r.steps["step"] > t) & (r.steps["step"] <= t + 20)
            nw = r.steps["layer"].map(r.layers.set_index("layer")["n_weights"])
            r.steps.loc[bump, "flip_ratio"] += burst
            r.steps.loc[bump, "flips"] = (r.steps.loc[bump, "flip_ratio"] * nw[bump]).round().astype(int)
        steps = np.arange(20, 201, 20)
        rng = np.random.default_rng(seed + (100 if role == "reset" else 0))
        acc = 0.9 + 0.002 * rng.standard_normal(steps.size) - (acc_gap if role == "reset" else 0) * (steps > t)
        r.train = pd.DataFrame({"step": steps, "epoch": steps // 20, "val_accuracy": acc, "val_loss": 1 - acc})
        runs.append(load_run(write_run(r, tmp_path / f"{role}-{mode}-s{seed}")))
    return runs


def test_transient_is_supported_and_damage_is_not(tmp_path):
    ok = [r for s in range(3) for r in _synthetic_pair(tmp_path / "ok", s, acc_gap=0.0, burst=0.01)]
    res = analyse_resets(ok)
    assert len(res.pairs) == 3 and (res.pairs["excess_flips"] > 0.15).all()
    [v] = reset_verdicts(res.pairs)
    assert v.verdict == "supported" and v.id == "inertia.magnitude_reset" and v.n == 3
    bad = [r for s in range(3) for r in _synthetic_pair(tmp_path / "bad", s, acc_gap=0.1, burst=0.01)]
    [v] = reset_verdicts(analyse_resets(bad).pairs)
    assert v.verdict == "not supported" and v.statistic == pytest.approx(-0.1, abs=0.01)


def test_no_burst_or_two_seeds_is_inconclusive(tmp_path):
    flat = [r for s in range(3) for r in _synthetic_pair(tmp_path / "flat", s, acc_gap=0.0, burst=0.0)]
    [v] = reset_verdicts(analyse_resets(flat).pairs)
    assert v.verdict == "inconclusive" and "did not measurably change flipping" in v.reason
    two = [r for s in range(2) for r in _synthetic_pair(tmp_path / "two", s, acc_gap=0.0, burst=0.01)]
    [v] = reset_verdicts(analyse_resets(two).pairs)
    assert v.verdict == "inconclusive" and "2 seed(s) < 3" in v.reason


def test_unmatched_arms_are_left_out_with_a_note(tmp_path):
    runs = _synthetic_pair(tmp_path, 0, 0.0, 0.01)
    res = analyse_resets(runs[:1])
    assert res.pairs.empty and "not one of each" in res.notes[0]


def _real_valued_arm(data, seed: int, role: str, t: int, out) -> None:
    """A real-valued MLP (no binarisation) trained with SGD; the reset arm resets |w| at t, signs kept."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = {"dataset": "digits", "model": "real-mlp", "optimizer": "sgd", "seed": seed,
           "intervention": {"pair": f"real-s{seed}", "role": role, "step": t, "mode": "shuffle"}}
    probe = bnn_probe.attach(model, opt, out, binary=["0.weight", "2.weight"], tensorboard=False, hist_every=0,
                             snapshot_every=0, track=4, config=cfg)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(3):
        for x, y in data.batches(50, gen):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step == t and role == "reset":
                reset_inertia(opt, params=[model[0].weight, model[2].weight], mode="shuffle", seed=seed)
            if step % 3 == 0:
                loss, acc = bnn_probe.train.evaluate(model, data.x_val, data.y_val)
                probe.log(step=step, val_loss=loss, val_accuracy=acc)
    probe.close()


def test_null_control_real_valued_network_is_not_supported(tmp_path):
    """Null control: in a real-valued network the magnitudes ARE the model, so resetting them does lasting damage
    and the verdict must say "not supported"."""
    from bnn_probe.data import load_dataset

    data = load_dataset("digits")
    for seed in range(3):
        for role in ("control", "reset"):
            _real_valued_arm(data, seed, role, 72, tmp_path / f"{role}-{seed}")
    runs = [load_run(p) for p in sorted(tmp_path.iterdir())]
    res = analyse_resets(runs)
    assert len(res.pairs) == 3
    [v] = reset_verdicts(res.pairs)
    assert v.verdict == "not supported", v.reason
    assert v.statistic < -0.02 and "lasting damage" in v.reason


def test_intervention_runs_of_the_inertia_study():
    from bnn_probe.studies import StudyOptions, intervention_runs, plan_study

    specs = intervention_runs(StudyOptions(seeds=(0, 1, 2), epochs=4))
    assert len(specs) == 18
    names = {s.name for s in plan_study("inertia", StudyOptions(seeds=(0, 1, 2), epochs=4))}
    assert {s.name for s in specs} <= names
    steps = 4 * 29 // 2  # digits: 1437 training samples, batch 50 -> 29 steps per epoch; T = half of the run
    by_pair: dict[str, dict[str, object]] = {}
    for s in specs:
        iv = s.config.intervention
        assert iv["step"] == steps
        by_pair.setdefault(iv["pair"], {})[iv["role"]] = s.config
    assert len(by_pair) == 9
    for arms in by_pair.values():
        c, r = arms["control"], arms["reset"]
        from dataclasses import replace

        assert replace(c, intervention=None) == replace(r, intervention=None)  # same options and seed
    assert all(s.config.latent_eval is (s.config.optimizer == "latent-adam" or None) for s in specs)
    assert {(s.config.optimizer, s.config.intervention["mode"]) for s in specs} == {
        ("latent-adam", "constant"), ("latent-adam", "shuffle"), ("bop", "zero")}


def test_a_resumed_probe_keeps_the_interventions(tmp_path):
    model = BinaryMLP(6, [5], 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False)
    model(torch.randn(8, 6)).sum().backward()
    opt.step()
    reset_inertia(opt, mode="constant")
    probe.close()
    again = bnn_probe.attach(model, opt, tmp_path / "r", tensorboard=False, resume=True)
    again.load_state_dict(probe.state_dict())
    again.mark_intervention("reset_inertia", step=1, mode="constant", seed=0, n_changed=0)  # the same step redone
    again.close()
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert [(e["step"], e["kind"], e["n_changed"]) for e in meta["interventions"]] == [(1, "reset_inertia", 0)]
