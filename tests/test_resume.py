"""Resume: a training subprocess SIGKILLed after a checkpoint, resumed, equals an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import bnn_probe
from bnn_probe.cli import main
from bnn_probe.errors import BnnProbeError
from bnn_probe.resume import checkpoint_path, load_checkpoint, resume_config
from bnn_probe.train import TrainConfig, resume_training, train

CONFIG = dict(widths=(32,), epochs=12, batch_size=64, hist_every=7, snapshot_every=20, track=8, seed=3, gamma=1e-3,
              threshold=1e-6)
OPTS = dict(checkpoint_every=3, flush_every_steps=5, tensorboard=False)

_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from bnn_probe.train import TrainConfig, train
    train(TrainConfig(**{cfg}), sys.argv[1], progress=False, **{opts})
""")


def _raw_steps(run: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted((run / "steps").glob("part-*.parquet"))])


def _kill_after_checkpoint(out: Path) -> dict:
    """Start the run in a subprocess; SIGKILL it once a checkpoint (epoch >= 3) exists and the log already holds
    rows after that checkpoint's step. Returns the checkpoint it was killed after."""
    script = _SCRIPT.format(cfg=repr(CONFIG), opts=repr(OPTS))
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    ckpt = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            try:
                meta = json.loads((out / "meta.json").read_text())
                ck = load_checkpoint(out)
            except (OSError, ValueError, BnnProbeError):
                continue
            if ck is not None and ck["epoch"] >= 3 and meta["last_step"] > ck["step"]:
                ckpt = ck
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None and ckpt is None:
            proc.kill()
        proc.wait()
    assert ckpt is not None and proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    return ckpt


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    ref = train(TrainConfig(**CONFIG), tmp_path / "ref", progress=False, **OPTS)
    killed = tmp_path / "killed"
    ckpt = _kill_after_checkpoint(killed)
    before = bnn_probe.load_run(killed)
    assert before.status == "running"
    assert before.steps["step"].max() > ckpt["step"]  # rows logged after the checkpoint: they must be replaced
    resume_training(killed, progress=False, **OPTS)
    print(f"killed after the checkpoint at step {ckpt['step']} (epoch {ckpt['epoch']}); log had reached step "
          f"{before.steps['step'].max()}")

    a, b = bnn_probe.load_run(ref), bnn_probe.load_run(killed)
    assert b.status == "finished" and b.meta["config"] == a.meta["config"]
    n_steps = a.steps["step"].max()
    assert b.steps["step"].max() == n_steps and sorted(b.steps["step"].unique()) == list(range(1, n_steps + 1))
    raw = _raw_steps(killed)
    assert raw.duplicated(["step", "layer"]).sum() > 0  # the killed run's rows after the checkpoint were rewritten
    print(f"{raw.duplicated(['step', 'layer']).sum()} (step, layer) rows written twice, replaced on read")
    pd.testing.assert_frame_equal(a.steps, b.steps)
    for table in ("tracked", "events", "hists", "snapshots", "weight_flips"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table), obj=table)
    ta, tb = (r.train.drop(columns=["wall_seconds"]) for r in (a, b))
    pd.testing.assert_frame_equal(ta, tb)
    # the final model (binary weights, batch norm) and optimizer state, bit for bit
    fa, fb = load_checkpoint(ref), load_checkpoint(killed)
    assert fa["step"] == fb["step"] == n_steps
    for k, v in fa["model"].items():
        assert torch.equal(v, fb["model"][k]), k
    ma = fa["optimizer"]["optimizers"][0]["state"]
    mb = fb["optimizer"]["optimizers"][0]["state"]
    assert all(torch.equal(ma[i]["exp_avg"], mb[i]["exp_avg"]) for i in ma)
    # per-weight flip counters survived the kill: the probe's counters equal the uninterrupted run's
    for name, st in fa["probe"]["layers"].items():
        assert torch.equal(st["count"], fb["probe"]["layers"][name]["count"]), name


def test_resume_before_first_checkpoint_restarts(tmp_path):
    cfg = TrainConfig(widths=(16,), epochs=2, batch_size=128, seed=1)
    ref = train(cfg, tmp_path / "ref", progress=False, tensorboard=False, checkpoint_every=0)
    # a run that has a log but no checkpoint (killed before its first one): resume starts it over in place
    other = train(cfg, tmp_path / "b", progress=False, tensorboard=False, checkpoint_every=0)
    assert not checkpoint_path(other).exists()
    resume_training(other, progress=False, tensorboard=False)
    a, b = bnn_probe.load_run(ref), bnn_probe.load_run(other)
    pd.testing.assert_frame_equal(a.steps, b.steps)
    assert b.status == "finished" and checkpoint_path(other).exists()


def test_cli_resume(tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--widths", "16", "--epochs", "1", "--batch-size", "128", "--out", str(out), "--no-progress"])
    assert load_checkpoint(out)["epoch"] == 1
    assert resume_config(out)["widths"] == [16]
    main(["train", "--resume", str(out), "--no-progress"])  # nothing left to train: it stays finished
    assert bnn_probe.load_run(out).status == "finished"
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", str(tmp_path / "nothing")])
    assert e.value.code == 2
    assert "no run there" in capsys.readouterr().err
    checkpoint_path(out).write_bytes(b"torn")
    with pytest.raises(SystemExit):
        main(["train", "--resume", str(out)])
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing a checkpoint leaves the previous one intact."""
    cfg = TrainConfig(widths=(16,), epochs=1, batch_size=128, seed=1)
    out = train(cfg, tmp_path / "run", progress=False, tensorboard=False)
    good = checkpoint_path(out).read_bytes()
    from bnn_probe import resume as rmod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rmod.torch, "save", boom)
    state = type("S", (), {})()
    ck = load_checkpoint(out)
    state.probe, state.config, state.out_dir = None, ck["config"], out
    state.model, state.optimizer = torch.nn.Linear(1, 1), torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), 0.1)
    state.generator, state.epoch, state.step, state.history = torch.Generator(), 0, 0, []
    with pytest.raises(OSError):
        rmod.save_checkpoint(state)
    assert checkpoint_path(out).read_bytes() == good
    assert os.path.exists(out)
