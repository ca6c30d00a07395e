"""DDP with the probe: 2 gloo processes on CPU (torch.multiprocessing.spawn), a tiny binary MLP on digits.

Checks: only global rank 0 writes; the cross-rank sign-hash check runs on its sparse schedule (one all_gather per
check, none on the other steps), logs rank_divergence = 0 while ranks agree and flags a planted divergence; with
synchronised batch norm the per-step flip counts equal those of a one-process run with the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import bnn_probe
from bnn_probe.data import load_digits
from bnn_probe.models import BinaryMLP
from bnn_probe.optim import binary_init_, bnn_optimizer
from bnn_probe.parallel import SyncBatchNormCPU, global_mean_loss, shard, sync_batchnorm, unwrap, wrap_ddp
from bnn_probe.probe.distributed import RankDivergenceWarning, layer_sign_hashes

STEPS, BATCH, CHECK_EVERY = 24, 64, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(seed: int = 0):
    torch.manual_seed(seed)
    model = BinaryMLP(64, [48, 32], 10)
    binary_init_(model, seed=seed)
    return model


def _batches():
    data = load_digits()
    g = torch.Generator().manual_seed(1)
    out = []
    while len(out) < STEPS:
        out.extend(data.batches(BATCH, g))
    return out[:STEPS]


def _train(model, opt, rank: int, world: int, logdir: Path, ddp_model=None) -> None:
    probe = bnn_probe.attach(unwrap(model), opt, logdir, hist_every=CHECK_EVERY, snapshot_every=0, track=0,
                             events_per_layer=0, tensorboard=False, flush_secs=1e9)
    fwd = ddp_model if ddp_model is not None else model
    for x, y in _batches():
        xs, ys = shard(x, y, rank, world)
        loss = global_mean_loss(fwd(xs), ys, len(y), world)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    # a file rendezvous in the test's folder: no race for a free TCP port between probing and binding it
    torch.distributed.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg_store')}", rank=rank,
                                         world_size=world)
    calls = {"all_gather": 0}
    real = torch.distributed.all_gather

    def counting(*a, **k):
        calls["all_gather"] += 1
        return real(*a, **k)

    torch.distributed.all_gather = counting
    model = sync_batchnorm(_build(), "cpu")
    assert any(isinstance(m, SyncBatchNormCPU) for m in model.modules())
    opt = bnn_optimizer(model, gamma=1e-2, threshold=1e-6)
    ddp = wrap_ddp(model, bnn_probe.parallel.DistInfo(rank, world))
    probe = _train(model, opt, rank, world, Path(tmp) / f"ddp_r{rank}", ddp_model=ddp)
    n_checks = calls["all_gather"]
    # plant a divergence: rank 1 flips one binary weight outside the optimizer; the next check must see it
    if rank == 1:
        with torch.no_grad():
            model[1].weight.view(-1)[0].neg_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe.rank_check(probe, probe.step + 1)
    probe.close()
    hashes = layer_sign_hashes([p for _, p in bnn_probe.nn.named_binary_parameters(model)])
    res = {"rank": rank, "active": probe.active, "n_checks": n_checks, "history": probe.rank_check.history,
           "warned": [str(w.message) for w in caught if issubclass(w.category, RankDivergenceWarning)],
           "hashes": hashes.tolist()}
    (Path(tmp) / f"res{rank}.json").write_text(json.dumps(res))
    del ddp  # the DDP reducer goes while the group exists; all ranks meet before the group is destroyed
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp)), nprocs=2, join=True)
    # one process, same global batch, plain batch norm
    model = _build()
    opt = bnn_optimizer(model, gamma=1e-2, threshold=1e-6)
    _train(model, opt, 0, 1, tmp / "single").close()
    hashes = layer_sign_hashes([p for _, p in bnn_probe.nn.named_binary_parameters(model)])
    (tmp / "single_hashes.json").write_text(json.dumps(hashes.tolist()))
    return tmp


def test_only_rank_zero_writes(ddp_runs):
    r0, r1 = (json.loads((ddp_runs / f"res{r}.json").read_text()) for r in (0, 1))
    assert r0["active"] and not r1["active"]
    assert (ddp_runs / "ddp_r0" / "meta.json").is_file()
    assert not (ddp_runs / "ddp_r1").exists()  # rank 1 created nothing at all
    run = bnn_probe.load_run(ddp_runs / "ddp_r0")
    assert run.meta["world_size"] == 2
    assert run.status == "finished"
    assert sorted(run.steps["step"].unique().tolist()) == list(range(1, STEPS + 1))


def test_rank_check_schedule_and_divergence(ddp_runs):
    r0, r1 = (json.loads((ddp_runs / f"res{r}.json").read_text()) for r in (0, 1))
    # one all_gather per check on the hist_every schedule, none on the other steps
    assert r0["n_checks"] == r1["n_checks"] == STEPS // CHECK_EVERY
    run = bnn_probe.load_run(ddp_runs / "ddp_r0")
    div = run.train.dropna(subset=["rank_divergence"]) if "rank_divergence" in run.train else None
    assert div is not None
    by_step = dict(zip(div["step"].tolist(), div["rank_divergence"].tolist(), strict=True))
    for s in range(CHECK_EVERY, STEPS + 1, CHECK_EVERY):
        assert by_step[s] == 0.0  # ranks held identical binary weights during training
    assert by_step[STEPS + 1] == 1.0  # the planted flip: one layer differs
    assert r0["history"] == [[STEPS + 1, ["fc1.weight"]]] == r1["history"]
    assert r0["warned"] and "fc1.weight" in r0["warned"][0] and not r1["warned"]
    assert r0["hashes"][0] != r1["hashes"][0] and r0["hashes"][1:] == r1["hashes"][1:]


def test_flips_match_single_process(ddp_runs):
    ddp = bnn_probe.load_run(ddp_runs / "ddp_r0").steps.set_index(["step", "layer"])["flips"]
    one = bnn_probe.load_run(ddp_runs / "single").steps.set_index(["step", "layer"])["flips"]
    assert len(ddp) == len(one) == STEPS * 3
    assert one.sum() > 20  # the comparison has something to compare
    diff = (ddp - one).abs()
    # float rounding (gradient all-reduce order, two-pass global BN statistics) may move a weight sitting exactly
    # at its threshold; allow a handful of single-weight differences over the run, no more
    assert diff.sum() <= max(2, int(0.01 * one.sum())), diff[diff > 0]
    single = json.loads((ddp_runs / "single_hashes.json").read_text())
    r0 = json.loads((ddp_runs / "res0.json").read_text())
    assert r0["hashes"] == single  # rank 0 (untouched by the planted flip) ends with the one-process binary weights
    print(f"DDP vs 1-process flips: {int((diff == 0).sum())}/{len(diff)} (step, layer) rows equal; "
          f"total flips {int(ddp.sum())} vs {int(one.sum())}")


@pytest.mark.slow
def test_cli_under_torchrun_matches_one_process(tmp_path):
    """`bnn-probe train` unchanged under torchrun (2 gloo processes): --batch-size is the global batch."""
    import subprocess
    import sys

    args = ["train", "--widths", "32", "--epochs", "2", "--batch-size", "96", "--gamma", "1e-3", "--threshold",
            "1e-6", "--threads", "1", "--no-progress", "--hist-every", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "bnn_probe.cli", *args, "--out", str(tmp_path / "ddp")], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "bnn_probe.cli", *args, "--out", str(tmp_path / "one")], check=True,
                   env=env, timeout=300)
    ddp, one = bnn_probe.load_run(tmp_path / "ddp"), bnn_probe.load_run(tmp_path / "one")
    assert ddp.status == one.status == "finished"
    assert ddp.meta["world_size"] == 2 and one.meta["world_size"] == 1
    a = ddp.steps.set_index(["step", "layer"])["flips"]
    b = one.steps.set_index(["step", "layer"])["flips"]
    assert a.index.equals(b.index) and b.sum() > 0
    diff = (a - b).abs()
    assert diff.sum() <= max(2, int(0.01 * b.sum())), diff[diff > 0]
    assert (ddp.train["rank_divergence"].dropna() == 0).all() and ddp.train["rank_divergence"].notna().sum() >= 2
    # the logged per-step loss is the global-batch mean, as in the one-process run
    la = ddp.train.dropna(subset=["train_loss"])["train_loss"].to_numpy()
    lb = one.train.dropna(subset=["train_loss"])["train_loss"].to_numpy()
    assert len(la) == len(lb) and abs(la - lb).max() < 1e-4
    print(f"torchrun CLI: {int((diff == 0).sum())}/{len(diff)} (step, layer) flip counts equal; "
          f"total {int(a.sum())} vs {int(b.sum())}; max |Δ train_loss| {abs(la - lb).max():.2e}")
