"""The run log on disk: crash safety (SIGKILL), broken parts, versioning, errors, find_runs, TensorBoard files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import bnn_probe
from bnn_probe.errors import RunLogError
from bnn_probe.models import BinaryMLP
from bnn_probe.runlog import empty_frame, find_runs, load_run


def _train(logdir, steps=4, **opts):
    model = BinaryMLP(8, [6], 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    probe = bnn_probe.attach(model, opt, logdir, quantile_every=1, **opts)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(5, 8)), torch.randint(0, 3, (5,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        probe.log(loss=loss.item())
    return probe


def test_sigkill_run_readable_up_to_last_flush(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, torch
        import bnn_probe
        from bnn_probe.models import BinaryMLP
        torch.set_num_threads(1)
        model = BinaryMLP(8, [6], 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        probe = bnn_probe.attach(model, opt, {str(tmp_path / "run")!r}, flush_every_steps=5, flush_secs=1000,
                                 tensorboard=False)
        for step in range(1, 13):
            loss = model(torch.randn(5, 8)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            probe.log(loss=loss.item())
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    run = load_run(tmp_path / "run")
    assert run.status == "running" and not run.finished
    assert run.meta["last_step"] == 10
    assert sorted(run.steps.step.unique()) == list(range(1, 11))  # steps 11, 12 were never flushed
    assert run.train.step.tolist() == list(range(1, 10))  # step 10 was logged after the flush in its step hook
    assert run.weight_flips.step.unique().tolist() == [10]


def test_truncated_part_is_skipped_with_warning(tmp_path):
    _train(tmp_path / "run", steps=6, flush_every_steps=3, tensorboard=False).close()
    parts = sorted((tmp_path / "run" / "steps").glob("part-*.parquet"))
    assert len(parts) == 2
    data = parts[1].read_bytes()
    parts[1].write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="part-000001.parquet"):
        steps = load_run(tmp_path / "run").steps
    assert sorted(steps.step.unique()) == [1, 2, 3]


def test_newer_schema_and_broken_dirs_are_one_line_errors(tmp_path):
    _train(tmp_path / "run", steps=1, tensorboard=False).close()
    meta_path = tmp_path / "run" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["schema_version"] = 3
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RunLogError, match=r"written by a newer bnn-probe \(schema 3 > 2\): upgrade bnn-probe"):
        load_run(tmp_path / "run")
    with pytest.raises(RunLogError, match="not found"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunLogError, match="not a bnn-probe run directory"):
        load_run(tmp_path / "empty")
    meta_path.write_text("{not json")
    with pytest.raises(RunLogError, match="unreadable meta.json") as e:
        load_run(tmp_path / "run")
    assert "\n" not in str(e.value)


def test_find_runs_and_empty_tables(tmp_path):
    _train(tmp_path / "study" / "b", steps=1, tensorboard=False, track=0, events_per_layer=0).close()
    _train(tmp_path / "study" / "a", steps=1, tensorboard=False).close()
    assert find_runs(tmp_path / "study") == [tmp_path / "study" / "a", tmp_path / "study" / "b"]
    assert find_runs(tmp_path / "study" / "a") == [tmp_path / "study" / "a"]
    with pytest.raises(RunLogError):
        find_runs(tmp_path / "missing")
    run = load_run(tmp_path / "study" / "b")
    assert run.name == "b" and run.path == tmp_path / "study" / "b"
    for table in ("tracked", "events", "hists", "snapshots"):
        df = getattr(run, table)
        assert df.empty and list(df.columns) == list(empty_frame(table).columns)


def test_tensorboard_files_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path / "run", steps=4, hist_every=2).close()
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"flip_ratio/fc1.weight", "c2i/fc2.weight", "abs_w_q50/fc1.weight", "loss"} <= set(tags["scalars"])
    assert not any(t.startswith(("threshold/", "abs_m_q50/")) for t in tags["scalars"])  # latent: τ is NaN, no m
    assert "abs_w/fc1.weight" in tags["histograms"]
    steps = load_run(tmp_path / "run").steps
    fr = steps[steps.layer == "fc1.weight"].flip_ratio.tolist()
    ev = acc.Scalars("flip_ratio/fc1.weight")
    assert [e.step for e in ev] == [1, 2, 3, 4]
    assert [e.value for e in ev] == pytest.approx(fr, rel=1e-6)
    q = steps[steps.layer == "fc2.weight"].abs_w_q50
    assert [e.value for e in acc.Scalars("abs_w_q50/fc2.weight")] == np.asarray(q, dtype=np.float32).tolist()
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx(load_run(tmp_path / "run").train["loss"].tolist(),
                                                                  rel=1e-6)
    hist = acc.Histograms("abs_w/fc1.weight")
    assert [h.step for h in hist] == [2, 4] and hist[0].histogram_value.num == 48


def test_tensorboard_gets_each_layers_threshold_for_bop(tmp_path):
    """Every logged step of every layer: flip_ratio, c2i, abs_m_q50 and τ in TensorBoard are the steps table's
    values (as float32), across drains (``buffer_steps``); a cadence ``tb_every`` keeps the steps it selects."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bnn_probe.nn import named_binary_parameters
    from bnn_probe.optim import Bop

    model = BinaryMLP(8, [6], 3)
    binary = list(named_binary_parameters(model))
    groups = [{"params": [p], "threshold": t} for (_, p), t in zip(binary, (1e-3, 2e-3, 4e-3), strict=False)]
    opt = Bop(groups, gamma=0.1)
    probe = bnn_probe.attach(model, opt, tmp_path / "run", quantile_every=1,
                             buffer_steps=4, tb_every=lambda s: s % 3 != 0)
    for _ in range(10):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(5, 8)), torch.randint(0, 3, (5,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    probe.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    names = [n for n, _ in binary][:2]
    assert {f"threshold/{n}" for n in names} <= set(acc.Tags()["scalars"])
    assert [e.value for e in acc.Scalars(f"threshold/{names[1]}")] == pytest.approx([2e-3] * 7)
    steps = load_run(tmp_path / "run").steps
    shown = [s for s in range(1, 11) if s % 3 != 0]
    for name in names:
        rows = steps[(steps.layer == name) & steps.step.isin(shown)]
        for q in ("flip_ratio", "c2i", "abs_m_q50", "threshold"):
            ev = acc.Scalars(f"{q}/{name}")
            assert [e.step for e in ev] == shown
            assert [e.value for e in ev] == np.asarray(rows[q], dtype=np.float32).tolist()
