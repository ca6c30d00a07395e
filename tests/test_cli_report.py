"""`bnn-probe report / compare / summary`: outputs, and one-line errors with exit code 2 on bad input."""

import json

import pytest
from conftest import run_cli

from bnn_probe.reports.synthetic import make_run, write_run

SMALL = {"n_steps": 40, "n_tracked": 8}


def _run_cli(capsys, *args):
    return run_cli(list(args), capsys)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_run(make_run("a", seed=1, snapshot_every=10, **SMALL), root / "study" / "a")
    write_run(make_run("b", seed=2, trajectory_seed=1, diverge_at=17, snapshot_every=10, **SMALL),
              root / "study" / "b")
    write_run(make_run("killed", seed=3, status="running", **SMALL), root / "killed")
    write_run(make_run("thin", layers=(("fc1.weight", 64, 4096),), **SMALL), root / "thin")
    short = make_run("short", seed=4, snapshot_every=1000, **SMALL)  # shorter than the snapshot cadence
    short.train = short.train.rename(columns={"val_accuracy": "test_accuracy"})
    write_run(short, root / "short")
    write_run(make_run("short2", seed=5, snapshot_every=1000, **SMALL), root / "short2")
    return root


def test_report_command_writes_the_report(runs, tmp_path, capsys):
    code, out, err = _run_cli(capsys, "report", str(runs / "study"), str(runs / "killed"), "--out",
                              str(tmp_path / "r"), "--format", "md", "--quiet")
    assert code == 0, err
    assert "Wrote" in out and (tmp_path / "r" / "report.md").exists() and not (tmp_path / "r" / "report.html").exists()
    assert "did not finish" in err  # the killed run is reported, with a visible warning
    assert json.loads((tmp_path / "r" / "verdicts.json").read_text())


def test_compare_json_and_text(runs, capsys):
    code, out, _ = _run_cli(capsys, "compare", str(runs / "study" / "a"), str(runs / "study" / "b"), "--json")
    assert code == 0
    d = json.loads(out)
    assert d["first_difference_step"] == 17 and d["max_hamming"] > 0
    code, out, _ = _run_cli(capsys, "compare", str(runs / "study" / "a"), str(runs / "study" / "a"), "--json")
    d = json.loads(out)
    assert d["first_difference_step"] is None and d["max_hamming"] == 0
    code, out, _ = _run_cli(capsys, "compare", str(runs / "study" / "a"), str(runs / "study" / "b"))
    assert code == 0 and "first step at which the binary weights differ: 17" in out


def test_compare_says_why_hamming_is_absent(runs, capsys):
    code, out, _ = _run_cli(capsys, "compare", str(runs / "short"), str(runs / "short2"), "--json")
    d = json.loads(out)
    assert code == 0 and d["hamming"] == [] and d["max_hamming"] is None
    assert any("no Hamming distance: the runs share no snapshot step" in n for n in d["notes"])
    code, out, _ = _run_cli(capsys, "compare", str(runs / "short"), str(runs / "short2"))
    assert "--snapshot-every" in out
    code, out, _ = _run_cli(capsys, "compare", str(runs / "study" / "a"), str(runs / "study" / "b"), "--json")
    assert not any("no Hamming" in n for n in json.loads(out)["notes"])


def test_summary_names_the_optimizer_and_finds_other_accuracy_names(runs, capsys):
    code, out, _ = _run_cli(capsys, "summary", str(runs / "short"))
    assert code == 0 and "CaseOptimizer" not in out
    assert "test_accuracy 0." in out  # logged as test_accuracy, not val_accuracy


def test_summary(runs, capsys):
    code, out, err = _run_cli(capsys, "summary", str(runs / "study" / "a"))
    assert code == 0
    assert "finished" in out and "fc4.weight" in out and "accuracy" in out
    code, out, err = _run_cli(capsys, "summary", str(runs / "killed"))
    assert code == 0 and "did not finish" in out


def _assert_one_line_error(code, err, needle):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error:") and needle in lines[0]
    assert "Traceback" not in err


def test_bad_inputs(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    norun = tmp_path / "norun"
    (norun / "x").mkdir(parents=True)
    (norun / "x" / "notes.txt").write_text("hi")
    out = str(tmp_path / "out")
    _assert_one_line_error(*_run_cli(capsys, "report", str(tmp_path / "missing"), "--out", out)[::2],
                           "no such file")
    _assert_one_line_error(*_run_cli(capsys, "report", str(empty), "--out", out)[::2], "empty folder")
    _assert_one_line_error(*_run_cli(capsys, "report", str(norun), "--out", out)[::2], "no bnn-probe runs")
    _assert_one_line_error(*_run_cli(capsys, "summary", str(tmp_path / "missing"))[::2], "no such file")
    _assert_one_line_error(*_run_cli(capsys, "compare", str(runs / "study" / "a"), str(runs / "thin"))[::2],
                           "different architectures")
    _assert_one_line_error(*_run_cli(capsys, "report", str(runs / "study"), "--out", out, "--format", "pdf")[::2],
                           "--format")


def test_corrupted_part_and_newer_schema(tmp_path, capsys):
    bad = write_run(make_run("bad", **SMALL), tmp_path / "bad")
    (bad / "steps" / "part-000009.parquet").write_bytes(b"PAR1 this is not parquet")
    _assert_one_line_error(*_run_cli(capsys, "report", str(bad), "--out", str(tmp_path / "o"))[::2],
                           "part-000009.parquet")
    _assert_one_line_error(*_run_cli(capsys, "summary", str(bad))[::2], "part-000009.parquet")
    code, out, err = _run_cli(capsys, "summary", str(bad), "--skip-broken")
    assert code == 0 and "fc1.weight" in out
    new = write_run(make_run("new", **SMALL), tmp_path / "new")
    meta = json.loads((new / "meta.json").read_text())
    meta["schema_version"] = 99
    (new / "meta.json").write_text(json.dumps(meta))
    _assert_one_line_error(*_run_cli(capsys, "report", str(new), "--out", str(tmp_path / "o2"))[::2], "newer")
