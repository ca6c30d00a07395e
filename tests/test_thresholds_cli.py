"""``bnn-probe train --threshold-policy ...``: each policy end to end on a tiny digits run, the policy recorded in the
run's config, the from-report round trip, and one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

import bnn_probe

TINY = ["--widths", "64,8", "--batch-size", "100", "--epochs", "1", "--hist-every", "0", "--no-progress",
        "--threads", "1", "--gamma", "1e-3", "--threshold", "1e-6"]




def test_calibrated_and_fan_in_from_the_cli(tmp_path, capsys):
    code, _, err = run_cli(["train", *TINY, "--epochs", "2", "--threshold-policy", "calibrated", "--target-flip-ratio",
                         "1e-2", "--out", str(tmp_path / "cal")], capsys)
    assert code == 0, err
    run = bnn_probe.load_run(tmp_path / "cal")
    cfg = run.meta["config"]
    assert cfg["threshold_policy"] == "calibrated" and cfg["target_flip_ratio"] == 1e-2
    assert cfg["extra"]["threshold_policy"]["controller"]["target_flip_ratio"] == 1e-2
    assert run.steps["threshold"].nunique() > 1  # the controller moved τ, and the probe logged it

    code, _, err = run_cli(["train", *TINY, "--threshold-policy", "fan-in", "--fan-in-exponent", "1",
                         "--out", str(tmp_path / "fan")], capsys)
    assert code == 0, err
    pol = json.loads((tmp_path / "fan" / "meta.json").read_text())["config"]["extra"]["threshold_policy"]
    # fan-ins 64, 64, 8: n_ref = (64·64·8)^(1/3) = 32 → τ = 1e-6 · 32/n
    assert pol["args"]["reference_fan_in"] == 32
    assert pol["thresholds"] == pytest.approx({"fc1.weight": 5e-7, "fc2.weight": 5e-7, "fc3.weight": 4e-6})


def test_from_report_round_trip(tmp_path, capsys):
    code, _, err = run_cli(["train", *TINY, "--out", str(tmp_path / "g")], capsys)
    assert code == 0, err
    code, _, err = run_cli(["report", str(tmp_path / "g"), "--out", str(tmp_path / "rep"), "--format", "md"], capsys)
    assert code == 0, err
    import pandas as pd
    rec = pd.read_csv(tmp_path / "rep" / "tables" / "thresholds.csv").set_index("layer")["recommended_threshold"]
    code, _, err = run_cli(["train", *TINY, "--threshold-policy", "from-report", "--thresholds-csv",
                         str(tmp_path / "rep"), "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    used = bnn_probe.load_run(tmp_path / "r").steps.groupby("layer")["threshold"].first()
    assert used.to_dict() == pytest.approx(rec.to_dict())


@pytest.mark.parametrize("args, message", [
    (["--threshold-policy", "from-report"], "needs --thresholds-csv"),
    (["--threshold-policy", "from-report", "--thresholds-csv", "missing.csv"], "thresholds file not found"),
    (["--threshold-policy", "calibrated"], "needs --target-flip-ratio"),
    (["--threshold-policy", "calibrated", "--target-flip-ratio", "2"], "below 1"),
    (["--threshold-scale", "flow"], "--threshold-scale flow is for --threshold-policy normalized"),
    (["--threshold-policy", "normalized", "--threshold-scale", "flow", "--optimizer", "bop2nd"],
     "--threshold-scale flow is for --threshold-policy normalized with --optimizer bop"),
])
def test_policy_errors_are_one_line(tmp_path, capsys, args, message):
    code, _, err = run_cli(["train", *TINY, *args, "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_normalized_flow_scale_from_the_cli(tmp_path, capsys):
    """``--threshold-scale flow`` reaches the normalized controller (recorded in the run's config) and moves τ."""
    code, _, err = run_cli(["train", *TINY, "--epochs", "2", "--threshold-policy", "normalized", "--threshold-scale",
                            "flow", "--threshold-multiple", "1.5", "--out", str(tmp_path / "n")], capsys)
    assert code == 0, err
    run = bnn_probe.load_run(tmp_path / "n")
    cfg = run.meta["config"]
    assert cfg["threshold_scale"] == "flow"
    ctl = cfg["extra"]["threshold_policy"]["controller"]
    assert ctl["scale"] == "flow" and ctl["multiple"] == 1.5
    assert run.steps["threshold"].nunique() > 1
