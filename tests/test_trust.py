"""Untrusted run folders and careless commands (docs/trust.md): no code runs, nothing bnn-probe did not write is
deleted, no silent corruption. Every crafted file is built here; nothing in it is ever executed: a payload that ran
would create a marker folder (``os.mkdir``), and each test asserts that the marker does not exist."""

import errno
import json
import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_cli

from bnn_probe.data import CIFAR10_FILES
from bnn_probe.reports.synthetic import make_run, write_run
from bnn_probe.resume import checkpoint_path

TINY = ["--widths", "8", "--batch-size", "400", "--epochs", "1", "--hist-every", "0", "--no-progress"]
SMALL = {"n_steps": 20, "n_tracked": 4}


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: the marker appears only if a loader executed the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err


def _train(tmp_path, capsys, out, *args):
    return run_cli(["train", *TINY, "--out", str(out), *args], capsys)


def _tree(folder):
    """Every file below ``folder`` with its bytes (to assert that nothing was touched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------- code execution

def test_crafted_checkpoint_is_refused_without_running_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tmp_path, capsys, run)[0] == 0
    marker = tmp_path / "pwned"
    torch.save({"version": 1, "config": {"x": Payload(marker)}}, checkpoint_path(run))
    code, _, err = run_cli(["train", "--resume", str(run)], capsys)
    _one_line_error(code, err, "checkpoint.pt", "not a readable checkpoint")
    assert not marker.exists()


def _crafted_cifar(folder, marker):
    folder.mkdir(parents=True, exist_ok=True)
    for name in CIFAR10_FILES:
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": Payload(marker), b"labels": [0]}, fh, protocol=2)


def test_crafted_cifar_batches_are_refused_without_running_them(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _crafted_cifar(tmp_path / "cifar", marker)
    code, _, err = _train(tmp_path, capsys, tmp_path / "r", "--dataset", "cifar10", "--data-dir",
                          str(tmp_path / "cifar"))
    _one_line_error(code, err, "cannot read data_batch_1", "posix.mkdir is not allowed")
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_resume_of_a_meta_only_folder_pointing_at_crafted_cifar_runs_nothing(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    _crafted_cifar(run / "data", marker)
    cfg = {"dataset": "cifar10", "data_dir": str(run / "data"), "widths": [8], "epochs": 1}
    (run / "meta.json").write_text(json.dumps({"format": "bnn-probe-run", "schema_version": 1, "config": cfg}))
    code, _, err = run_cli(["train", "--resume", str(run)], capsys)
    _one_line_error(code, err, "cannot read data_batch_1")
    assert not marker.exists()


def test_the_cifar_unpickler_reads_every_protocol_and_refuses_float_or_object_arrays(tmp_path):
    import io

    from bnn_probe.data import CifarUnpickler

    d = {b"data": np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072), b"labels": [3, 7], b"batch_label": b"b",
         b"filenames": [b"a.png", b"b.png"]}
    for proto in range(6):
        back = CifarUnpickler(io.BytesIO(pickle.dumps(d, protocol=proto)), encoding="bytes").load()
        assert np.array_equal(back[b"data"], d[b"data"]) and back[b"labels"] == [3, 7]
    for bad in (np.zeros((2, 3), np.float64), np.array([Payload(tmp_path / "m")], dtype=object)):
        with pytest.raises(pickle.UnpicklingError):
            CifarUnpickler(io.BytesIO(pickle.dumps({b"data": bad}, protocol=2)), encoding="bytes").load()
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------------- deleted data

def test_overwrite_refuses_a_folder_whose_meta_json_is_not_a_run(tmp_path, capsys):
    proj = tmp_path / "project"
    (proj / "src").mkdir(parents=True)
    (proj / "meta.json").write_text(json.dumps({"name": "my web app"}))
    (proj / "src" / "thesis.tex").write_text("\\chapter{years of work}")
    before = _tree(proj)
    code, _, err = _train(tmp_path, capsys, proj, "--overwrite")
    _one_line_error(code, err, "holds no bnn-probe run")
    assert _tree(proj) == before


def test_overwrite_keeps_the_users_own_files_and_replaces_only_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tmp_path, capsys, run)[0] == 0
    (run / "notes.txt").write_text("mine")
    (run / "steps" / "my_plot.png").write_bytes(b"png")
    (run / "extra").mkdir()
    (run / "extra" / "data.csv").write_text("1,2")
    old_id = json.loads((run / "meta.json").read_text())["run_id"]
    code, _, err = _train(tmp_path, capsys, run, "--overwrite", "--seed", "5")
    assert code == 0, err
    assert "kept 3 file(s)" in err and "notes.txt" in err
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config"]["seed"] == 5 and meta["run_id"] != old_id
    assert (run / "notes.txt").read_text() == "mine" and (run / "steps" / "my_plot.png").read_bytes() == b"png"
    assert (run / "extra" / "data.csv").read_text() == "1,2"


def test_overwrite_deletes_nothing_when_the_new_runs_data_fails_to_load(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tmp_path, capsys, run)[0] == 0
    before = _tree(run)
    (tmp_path / "empty").mkdir()
    code, _, err = _train(tmp_path, capsys, run, "--overwrite", "--dataset", "cifar10", "--data-dir",
                          str(tmp_path / "empty"))
    _one_line_error(code, err, "missing data_batch_1")
    assert _tree(run) == before


def test_overwrite_never_follows_links(tmp_path, capsys):
    real = tmp_path / "real"
    assert _train(tmp_path, capsys, real)[0] == 0
    before = _tree(real)
    link = tmp_path / "link"
    link.symlink_to(real)
    code, _, err = _train(tmp_path, capsys, link, "--overwrite")
    _one_line_error(code, err, "symbolic link")
    assert _tree(real) == before
    # a link inside a run folder, where bnn-probe would delete and write: refused before anything is deleted
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "part-000000.parquet").write_bytes(b"precious")
    shutil.rmtree(real / "tracked")
    (real / "tracked").symlink_to(outside)
    before = _tree(real)
    code, _, err = _train(tmp_path, capsys, real, "--overwrite")
    _one_line_error(code, err, "symbolic link", "tracked")
    assert (outside / "part-000000.parquet").read_bytes() == b"precious" and _tree(real) == before


# ---------------------------------------------------------------------------------------------------- escaping

XSS = ("<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "[x](javascript:alert(3))")


def _hostile_run(name, tag="<script>alert(1)</script>"):
    run = make_run(name, tag=tag, config={"dataset": "[x](javascript:alert(3))", "note": "```\n<b>x</b>"}, **SMALL)
    evil = {n: f"{n}<img src=x onerror=alert(2)>" for n in run.layers["layer"]}
    for t in ("layers", "steps", "tracked", "snapshots", "weight_flips"):
        df = getattr(run, t)
        if len(df) and "layer" in df:
            setattr(run, t, df.assign(layer=df["layer"].map(evil)))
    run.meta["layers"] = list(evil.values())
    return run


def test_report_md_shows_hostile_names_as_text_never_as_markup(tmp_path, capsys):
    write_run(_hostile_run("a"), tmp_path / "runs" / "run [x](javascript:alert(3)) <img src=x onerror=alert(2)>")
    code, _, err = run_cli(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep"), "--quiet"], capsys)
    assert code == 0, err
    md = (tmp_path / "rep" / "report.md").read_text()
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "onerror=alert(2)" in md.replace("\\(", "(").replace("\\)", ")")  # the text is there ...
    # ... but never as markup; inside a fenced code block it is inert, as long as the fence is longer than any run
    # of backticks in the block (the config value holds ```)
    prose, fence = [], None
    for line in md.splitlines():
        if fence is None and line.startswith("```"):
            fence = line[:len(line) - len(line.lstrip("`"))]
            assert len(fence) >= 4 or "json" not in line
        elif fence is not None and line == fence:
            fence = None
        elif fence is None:
            prose.append(line)
        else:
            assert not line.startswith(fence)
    prose = "\n".join(prose)
    for bad in ("<script", "<img", "](javascript:", "<b>"):
        assert bad not in prose, bad
    for bad in ("<script", "<img src=x", "<b>x"):  # report.html escapes them too (a Markdown link is text there)
        assert bad not in html, bad


def test_summary_strips_terminal_control_characters(tmp_path, capsys):
    run = make_run("r", **SMALL)
    run.steps = run.steps.assign(layer=run.steps["layer"] + "\x1b[2J\x1b]0;owned\x07")
    run.layers = run.layers.assign(layer=run.layers["layer"] + "\x1b[2J\x1b]0;owned\x07")
    run.meta["status"] = "finished\x1b[31m"
    write_run(run, tmp_path / "r")
    code, out, err = run_cli(["summary", str(tmp_path / "r")], capsys)
    assert code == 0 and "fc1.weight?[2J" in out
    assert "\x1b" not in out + err and "\x07" not in out + err


# ---------------------------------------------------------------------------------------------------- unique run keys

def test_runs_with_the_same_folder_name_stay_apart(tmp_path, capsys):
    write_run(make_run("x", seed=1, gamma=1e-3, **SMALL), tmp_path / "s1" / "x")
    write_run(make_run("x", seed=2, gamma=1e-2, layers=(("fc1.weight", 32, 256),), **SMALL), tmp_path / "s2" / "x")
    code, _, err = run_cli(["report", str(tmp_path / "s1" / "x"), str(tmp_path / "s2" / "x"), "--out",
                            str(tmp_path / "rep"), "--quiet"], capsys)
    assert code == 0, err
    runs = pd.read_csv(tmp_path / "rep" / "tables" / "runs.csv")
    assert runs["run"].tolist() == ["s1/x", "s2/x"] and runs["gamma"].tolist() == [1e-3, 1e-2]
    layers = pd.read_csv(tmp_path / "rep" / "tables" / "layers.csv")
    assert set(layers.loc[layers["run"] == "s2/x", "layer"]) == {"fc1.weight"}
    curves = pd.read_csv(tmp_path / "rep" / "tables" / "flip_ratio_layers.csv")  # drawn one panel per run
    assert set(curves.loc[curves["run"] == "s2/x", "layer"]) == {"fc1.weight"}
    assert len(curves.loc[curves["run"] == "s1/x", "layer"].unique()) == 4
    for v in json.loads((tmp_path / "rep" / "verdicts.json").read_text()):
        assert "x" not in v["runs"]


def test_unique_keys():
    from bnn_probe.reports.load import unique_keys

    assert unique_keys(["/a/s1/x", "/a/s2/x", "/b/y"]) == ["s1/x", "s2/x", "y"]
    assert unique_keys(["/a/s1/x", "/b/s1/x"]) == ["a/s1/x", "b/s1/x"]
    assert unique_keys(["/a/x", "/a/x"]) == ["a/x", "a/x#2"]
    from bnn_probe.reports.load import unique_names

    runs = [make_run(n, **SMALL) for n in ("x", "x", "y")]  # objects without a folder: numbered
    unique_names(runs)
    assert [r.name for r in runs] == ["x", "x#2", "y"]


# ---------------------------------------------------------------------------------------------------- non-finite grads

@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("second_order", [False, True])
def test_nonfinite_gradient_entries_are_skipped_and_counted(foreach, second_order):
    from bnn_probe.optim import Bop, Bop2ndOrder

    kw = dict(gamma=0.5, sigma=0.5, threshold=0.1) if second_order else dict(gamma=0.5, threshold=0.1)
    cls = Bop2ndOrder if second_order else Bop
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    clean = torch.nn.Parameter(w.detach().clone())
    opt, ref = cls([w], foreach=foreach, **kw), cls([clean], foreach=foreach, **kw)
    w.grad = torch.tensor([0.3, float("nan"), float("inf"), -0.2])
    clean.grad = torch.tensor([0.3, 0.0, 0.0, -0.2])
    opt.step()
    ref.step()
    st = opt.state[w]
    # hand computation: m = 0.5·0 + 0.5·g for finite entries, unchanged (0) for the NaN/inf ones
    assert st["exp_avg"].tolist() == [0.15000000596046448, 0.0, 0.0, -0.10000000149011612]
    assert st["nonfinite_skipped"] == 2
    assert torch.isfinite(st["exp_avg"]).all()
    assert torch.equal(st["exp_avg"][[0, 3]], ref.state[clean]["exp_avg"][[0, 3]])  # finite entries: bit for bit
    if second_order:
        assert torch.isfinite(st["exp_avg_sq"]).all() and st["exp_avg_sq"][1:3].tolist() == [0.0, 0.0]
    assert torch.equal(w.data[[0, 3]], clean.data[[0, 3]]) and w.data[1:3].tolist() == [-1.0, 1.0]
    w.grad = torch.tensor([-1.0, 1.0, -1.0, 1.0])  # the skipped weights can flip again later
    opt.step()
    assert w.data.tolist() == [1.0, -1.0, 1.0, -1.0] and st["nonfinite_skipped"] == 2


def test_nan_in_training_leaves_bop_state_finite_and_summary_and_report_warn(tmp_path, capsys):
    from bnn_probe.train import TrainConfig, setup
    from bnn_probe.train import _train_loop as loop

    state = setup(TrainConfig(widths=(8,), epochs=1, batch_size=400, hist_every=0), tmp_path / "run")
    p = dict(state.model.named_parameters())[state.probe.layers[0].name]
    p.register_hook(lambda g: g.flatten().index_fill(0, torch.arange(100), float("nan")).view_as(g))
    loop(state, progress=False, checkpoint_every=0)
    bop = state.optimizer.optimizers[0] if hasattr(state.optimizer, "optimizers") else state.optimizer
    st = bop.state[p]
    assert torch.isfinite(st["exp_avg"]).all()
    assert st["nonfinite_skipped"] == 100 * state.step
    import bnn_probe

    steps = bnn_probe.load_run(tmp_path / "run").steps
    mine = steps[steps["layer"] == state.probe.layers[0].name]
    assert (mine["nonfinite_grads"] == 100).all() and len(mine) == state.step  # the probe logs them every step
    assert mine["abs_m_mean"].notna().all()  # the momentum stays finite: no NaN statistics from then on
    code, _, err = run_cli(["summary", str(tmp_path / "run")], capsys)
    assert code == 0 and f"had {100 * state.step} non-finite gradient entries" in err
    code, _, err = run_cli(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep"), "--format", "md",
                            "--quiet"], capsys)
    assert code == 0 and "non-finite gradient entries" in (tmp_path / "rep" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------- resume checks

def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(tmp_path, capsys, a)[0] == 0
    assert run_cli(["train", *TINY, "--widths", "32,32", "--out", str(b)], capsys)[0] == 0
    shutil.copy(checkpoint_path(a), checkpoint_path(b))
    before = _tree(b)
    code, _, err = run_cli(["train", "--resume", str(b)], capsys)
    _one_line_error(code, err, "belongs to another run")
    assert _tree(b) == before
    # same options, another run: the run id tells them apart
    c = tmp_path / "c"
    assert _train(tmp_path, capsys, c)[0] == 0
    shutil.copy(checkpoint_path(a), checkpoint_path(c))
    code, _, err = run_cli(["train", "--resume", str(c)], capsys)
    _one_line_error(code, err, "belongs to another run", "run id")


def test_resume_refuses_a_checkpoint_without_config_or_of_the_wrong_shape(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tmp_path, capsys, run)[0] == 0
    ckpt = torch.load(checkpoint_path(run), weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "config"}, checkpoint_path(run))
    _one_line_error(*run_cli(["train", "--resume", str(run)], capsys)[::2], "'config' is missing")
    torch.save({**ckpt, "step": "7"}, checkpoint_path(run))
    _one_line_error(*run_cli(["train", "--resume", str(run)], capsys)[::2], "'step' is a str")
    bad_model = {k: v[:1] if v.dim() else v for k, v in ckpt["model"].items()}
    torch.save({**ckpt, "model": bad_model}, checkpoint_path(run))
    _one_line_error(*run_cli(["train", "--resume", str(run)], capsys)[::2], "does not fit this run's model")


def test_threads_are_recorded_and_restored_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tmp_path, capsys, run, "--threads", "1", "--epochs", "2")[0] == 0
    assert json.loads((run / "meta.json").read_text())["config"]["threads"] == 1
    assert torch.load(checkpoint_path(run), weights_only=True)["threads"] == 1
    ckpt = torch.load(checkpoint_path(run), weights_only=True)
    torch.save({**ckpt, "epoch": 1}, checkpoint_path(run))  # as if killed after epoch 1
    torch.set_num_threads(2)
    try:
        code, _, err = run_cli(["train", "--resume", str(run)], capsys)
        assert code == 0, err
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------- writing safely

def _a_report(tmp_path, capsys):
    """A run ``a`` and its report ``rep`` (to be rewritten); returns the report folder and its files."""
    write_run(make_run("a", **SMALL), tmp_path / "a")
    rep = tmp_path / "rep"
    assert run_cli(["report", str(tmp_path / "a"), "--out", str(rep), "--quiet"], capsys)[0] == 0
    return rep, _tree(rep)


def test_a_killed_report_leaves_the_old_one_whole(tmp_path, capsys, monkeypatch):
    from bnn_probe.reports import build

    rep, before = _a_report(tmp_path, capsys)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "render_markdown", killed)
    with pytest.raises(KeyboardInterrupt):
        build.generate([tmp_path / "a"], rep, progress=False)
    assert _tree(rep) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "rep"]  # no temporary folder left


def test_disk_full_while_writing_a_report_is_one_line_and_keeps_the_old_report(tmp_path, capsys, monkeypatch):
    rep, before = _a_report(tmp_path, capsys)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    code, _, err = run_cli(["report", str(tmp_path / "a"), "--out", str(rep), "--quiet"], capsys)
    _one_line_error(code, err, "No space left on device", "previous report")
    assert _tree(rep) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a", "rep"]


def test_report_refuses_an_out_folder_holding_other_files(tmp_path, capsys):
    write_run(make_run("a", **SMALL), tmp_path / "a")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    code, _, err = run_cli(["report", str(tmp_path / "a"), "--out", str(tmp_path / "mine"), "--quiet"], capsys)
    _one_line_error(code, err, "thesis.tex")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "x"


def test_disk_full_while_training_is_one_line_and_marks_the_run_failed(tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq

    calls = {"n": 0}
    real = pq.write_table

    def filling(table, where, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            with open(where, "wb") as fh:  # a partial temporary file, as a full disk leaves
                fh.write(b"PAR1")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", filling)
    run = tmp_path / "run"
    code, _, err = _train(tmp_path, capsys, run)
    _one_line_error(code, err, "No space left on device", "marked failed")
    assert json.loads((run / "meta.json").read_text())["status"] == "failed"
    assert not [p for p in run.rglob("*.tmp")]


def test_a_full_disk_that_cannot_take_a_new_meta_json_still_marks_the_run_failed(tmp_path, capsys, monkeypatch):
    from bnn_probe.runlog import writer

    full = {"now": False}
    real_tmp = writer.tmp_path

    def no_room(path):  # no temporary file fits once the disk is full
        if full["now"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_tmp(path)

    def checkpoint_fills_the_disk(*a, **k):
        full["now"] = True
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "tmp_path", no_room)
    monkeypatch.setattr(torch, "save", checkpoint_fills_the_disk)
    run = tmp_path / "run"
    code, _, err = _train(tmp_path, capsys, run)
    _one_line_error(code, err, "No space left on device")
    text = (run / "meta.json").read_text()
    assert json.loads(text, parse_constant=pytest.fail)["status"] == "failed"  # patched in place, still strict JSON
    assert '"status": "failed" ' in text


def test_disk_full_while_checkpointing_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    def full(obj, f, *a, **k):
        f.write(b"PK")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    run = tmp_path / "run"
    code, _, err = _train(tmp_path, capsys, run)
    _one_line_error(code, err, "No space left on device")
    assert json.loads((run / "meta.json").read_text())["status"] == "failed"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def _lock_holder(run):
    """Another process holding the run's lock (as a second `train --resume` would); returns it once it holds it."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bnn_probe.rundir import RunLock; "
                               f"lock = RunLock({str(run)!r}); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path, capsys):
    from bnn_probe.errors import BnnProbeError
    from bnn_probe.rundir import RunLock
    from bnn_probe.rundir import tmp_path as tmp_name
    from bnn_probe.runlog import RunWriter

    run = tmp_path / "run"
    assert _train(tmp_path, capsys, run)[0] == 0
    before = {k: v for k, v in _tree(run).items() if k != ".bnn-probe.lock"}
    holder = _lock_holder(run)
    try:
        code, _, err = run_cli(["train", "--resume", str(run)], capsys)
        _one_line_error(code, err, f"being written by another bnn-probe process (pid {holder.pid})")
        code, _, err = _train(tmp_path, capsys, run, "--overwrite")
        _one_line_error(code, err, "being written by another bnn-probe process")
        with pytest.raises(BnnProbeError, match="another bnn-probe process"):  # a probe attached by hand, too
            RunWriter(run, tensorboard=False, resume=True)
    finally:
        holder.kill()
        holder.wait()
    assert {k: v for k, v in _tree(run).items() if k != ".bnn-probe.lock"} == before  # nothing written
    assert run_cli(["train", "--resume", str(run)], capsys)[0] == 0  # the lock ended with its process
    with RunLock(run), RunLock(run):  # re-entrant within one process (the runner and its probe's writer)
        RunWriter(run, tensorboard=False, resume=True).close()
    assert str(os.getpid()) in tmp_name(run / "meta.json").name  # temporary names are per process


# ---------------------------------------------------------------------------------------------------- one-line errors

@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**63)], "--seed must be a non-negative integer of at most 9223372036854775807"),
    (["--widths", "100000000000000000000"], "--widths must be comma-separated positive integers of at most"),
    (["--width-multiplier", "inf"], "--width-multiplier must be a finite number"),
    (["--width-multiplier", "nan"], "--width-multiplier must be a finite number"),
    (["--lr-real", "1e300"], "--lr-real must be a non-negative number (at most 1e+06)"),
    (["--gamma", "nan"], "--gamma must be a non-negative number"),
    (["--momentum", "1.5", "--optimizer", "latent-sgd"], "--momentum must be"),
    (["--target-flip-ratio", "inf", "--threshold-policy", "calibrated"], "--target-flip-ratio must be a finite"),
    (["--epochs", str(2**40)], "--epochs must be a non-negative integer (at most"),
])
def test_out_of_range_options_are_one_line_errors_and_leave_no_run(tmp_path, capsys, args, message):
    out = tmp_path / "r"
    code, _, err = _train(tmp_path, capsys, out, *args)
    _one_line_error(code, err, message)
    assert not out.exists()  # nothing written, so no run is left "running" to block the next one


def test_largest_seed_trains(tmp_path, capsys):
    code, _, err = _train(tmp_path, capsys, tmp_path / "r", "--seed", str(2**63 - 1), "--epochs", "0")
    assert code == 0, err


def test_meta_json_is_strict_json(tmp_path):
    from bnn_probe.runlog.writer import atomic_write_json

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    atomic_write_json(tmp_path / "m.json", {"a": float("inf"), "b": [float("nan"), 1.5], "c": np.float64("-inf")})
    assert strict((tmp_path / "m.json").read_text()) == {"a": None, "b": [None, 1.5], "c": None}


@pytest.mark.parametrize("field, value, message", [
    ("status", 5, "'status' must be a string"), ("config", "x", "'config' must be an object"),
    ("last_step", "ten", "'last_step' must be an integer"), ("tag", ["a"], "'tag' must be a string"),
    ("optimizer", "bop", "'optimizer' must be an object"), ("layers", {"a": 1}, "'layers' must be a list"),
    ("optimizer", {"class": "Bop", "groups": "g"}, "'optimizer.groups' must be a list of objects"),
    ("warnings", 5, "'warnings' must be a list"),
])
def test_meta_fields_of_the_wrong_type_are_one_line_errors(tmp_path, capsys, field, value, message):
    run = write_run(make_run("r", **SMALL), tmp_path / "r")
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, field: value}))
    for cmd in (["summary", str(run)], ["report", str(run), "--out", str(tmp_path / "rep"), "--quiet"]):
        _one_line_error(*run_cli(cmd, capsys)[::2], message)


def test_a_steps_part_with_a_string_step_column_is_one_line_or_skipped(tmp_path, capsys):
    run = write_run(make_run("r", **SMALL), tmp_path / "r")
    part = sorted((run / "steps").glob("part-*.parquet"))[0]
    df = pd.read_parquet(part)
    df.assign(step=df["step"].astype(str) + "th").to_parquet(part)
    for cmd in (["summary", str(run)], ["report", str(run), "--out", str(tmp_path / "rep"), "--quiet"]):
        _one_line_error(*run_cli(cmd, capsys)[::2], "column 'step'", "--skip-broken")
        code, _, err = run_cli([*cmd, "--skip-broken"], capsys)
        assert code == 0 and f"Warning: skipping unreadable run-log part {part}" in err


@pytest.mark.parametrize("config, message", [
    ({"epochs": "5"}, "--epochs must be a non-negative integer"),
    ({"widths": "abc"}, "--widths must be comma-separated positive integers"),
    ({"extra": 5}, "option extra must be a mapping"),
    ({"batch_norm": "yes"}, "option batch_norm must be true or false"),
    ({"latent_eval": "no"}, "option latent_eval must be true or false"),
    ({"intervention": {"pair": "p"}}, "intervention must be a dict with exactly the keys"),
    ({"width_multiplier": 1e309}, "must be a finite number"),
])
def test_resume_of_a_meta_json_with_wrong_typed_options_is_one_line(tmp_path, capsys, config, message):
    run = tmp_path / "run"
    run.mkdir()
    meta = {"format": "bnn-probe-run", "schema_version": 1, "config": {"widths": [8], "epochs": 1, **config}}
    (run / "meta.json").write_text(json.dumps(meta))
    _one_line_error(*run_cli(["train", "--resume", str(run)], capsys)[::2], message)
    assert sorted(p.name for p in run.iterdir()) == [".bnn-probe.lock", "meta.json"]


def test_compare_tells_runs_of_the_same_folder_name_apart(tmp_path, capsys):
    write_run(make_run("x", seed=1, **SMALL), tmp_path / "s1" / "x")
    write_run(make_run("x", seed=2, **SMALL), tmp_path / "s2" / "x")
    code, out, err = run_cli(["compare", str(tmp_path / "s1" / "x"), str(tmp_path / "s2" / "x")], capsys)
    assert code == 0 and out.startswith("s1/x vs s2/x:"), out + err


def test_the_owned_table_folders_are_the_run_log_tables():
    from bnn_probe.rundir import RUN_TABLE_DIRS
    from bnn_probe.runlog.schema import PART_TABLES

    assert set(RUN_TABLE_DIRS) == set(PART_TABLES)
