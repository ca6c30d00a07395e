"""``bnn-probe train`` and ``bnn-probe study`` through the console entry point: output, exit codes, one-line errors."""

import json

import pytest
from conftest import run_cli

TINY = ["--widths", "16", "--batch-size", "200", "--epochs", "1", "--hist-every", "0", "--no-progress"]




def test_train_writes_a_run_and_stores_every_option(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["train", *TINY, "--optimizer", "latent-sgd", "--momentum", "0.9", "--no-clip",
                            "--ste", "identity", "--init-scale", "0.5", "--tag", "t1", "--pair", "p",
                            "--pair-role", "b", "--decay-every", "1", "--threads", "1", "--out", str(out)], capsys)
    assert code == 0 and str(out) in stdout and "validation accuracy" in stdout
    meta = json.loads((out / "meta.json").read_text())
    cfg = meta["config"]
    assert (cfg["optimizer"], cfg["momentum"], cfg["clip"], cfg["ste"], cfg["init_scale"]) == \
        ("latent-sgd", 0.9, False, "identity", 0.5)
    assert (cfg["pair"], cfg["pair_role"], cfg["decay_every"], cfg["widths"]) == ("p", "b", 1, [16])
    assert meta["tag"] == "t1" and meta["status"] == "finished"


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--widths", "2048,,64"], "--widths must be comma-separated positive integers"),
    (["--epochs", "-3"], "--epochs must be a non-negative integer"),
    (["--dataset", "cifar10", "--data-dir", "nowhere"], "data_batch_1"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--data-dir", "somewhere"], "--data-dir is only read for --dataset cifar10"),
])
def test_train_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    code, _, err = run_cli(["train", *TINY, "--out", str(tmp_path / "r"), *args], capsys)
    assert code == 2
    assert err.startswith("Error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_train_refuses_an_existing_run_unless_overwrite(tmp_path, capsys):
    out = str(tmp_path / "r")
    assert run_cli(["train", *TINY, "--out", out], capsys)[0] == 0
    code, _, err = run_cli(["train", *TINY, "--out", out], capsys)
    assert code == 2 and "already holds a run" in err and err.count("\n") == 1
    assert run_cli(["train", *TINY, "--out", out, "--overwrite", "--seed", "2"], capsys)[0] == 0
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["config"]["seed"] == 2


def test_train_help_documents_defaults(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    for text in ("--gamma", "1e-4", "--threshold", "1e-8", "--lr-real", "0.01", "--batch-size", "50",
                 "--decay-every", "--clip / --no-clip", "--init-scale", "--probe-every", "--tag"):
        assert text in out, text


def test_study_help_lists_studies(capsys):
    code, out, _ = run_cli(["study", "--help"], capsys)
    assert code == 0
    for name in ("hyperparams", "inertia", "thresholds", "all", "--jobs", "--quick", "--seeds"):
        assert name in out


@pytest.mark.parametrize("args, message", [
    (["thresholds", "--widths", "64,,8"], "--widths must be"),
    (["nope"], "unknown study 'nope'"),
    (["hyperparams", "--seeds", "a"], "--seeds must be"),
    (["hyperparams", "--jobs", "-1"], "--jobs must be a non-negative integer"),
    (["hyperparams", "--epochs", "-1"], "--epochs must be a non-negative integer"),
])
def test_study_bad_input(tmp_path, capsys, args, message):
    code, _, err = run_cli(["study", *args, "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_study_trains_runs_side_by_side(tmp_path, capsys):
    out = tmp_path / "s"
    code, stdout, err = run_cli(["study", "hyperparams", "--out", str(out), "--epochs", "1", "--widths", "16",
                              "--jobs", "1", "--no-report", "--no-progress"], capsys)
    assert code == 0 and stdout.strip() == str(out)
    assert len([p for p in out.iterdir() if (p / "meta.json").exists()]) == 5
    assert "trained 5 run(s)" in err
