"""Review of bad input: one-line `Error: ...`, exit code 2, no traceback, no silently wrong report."""

import json
import shutil

import pytest
from conftest import run_cli

from bnn_probe.reports.synthetic import make_run, write_run

SMALL = {"n_steps": 20, "n_tracked": 4}


def _cli(capsys, *args):
    return run_cli(list(args), capsys)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_run(make_run("a", seed=1, **SMALL), root / "study" / "a")
    write_run(make_run("b", seed=2, **SMALL), root / "study" / "b")
    return root


def test_folder_with_a_run_whose_meta_json_is_gone_is_an_error_not_a_smaller_report(runs, tmp_path, capsys):
    folder = tmp_path / "study"
    shutil.copytree(runs / "study", folder)
    (folder / "b" / "meta.json").unlink()
    code, _, err = _cli(capsys, "report", str(folder), "--out", str(tmp_path / "r"), "--quiet")
    assert code == 2 and err.startswith("Error: ") and "no meta.json" in err and str(folder / "b") in err
    assert not (tmp_path / "r" / "report.html").exists()
    code, _, err = _cli(capsys, "summary", str(folder / "b"))
    assert code == 2 and "restore its meta.json" in err and "out of" not in err


def test_strict_broken_part_error_does_not_claim_to_skip(runs, tmp_path, capsys):
    run = tmp_path / "a"
    shutil.copytree(runs / "study" / "a", run)
    part = sorted((run / "steps").glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    code, _, err = _cli(capsys, "summary", str(run))
    assert code == 2 and err.startswith("Error: unreadable run-log part") and "--skip-broken" in err
    code, _, err = _cli(capsys, "summary", str(run), "--skip-broken")
    assert code == 0 and "Warning: skipping unreadable" in err


def test_compare_a_run_with_itself_warns(runs, capsys):
    a = str(runs / "study" / "a")
    code, out, err = _cli(capsys, "compare", a, a + "/", "--json")
    assert code == 0 and json.loads(out)["first_difference_step"] is None
    assert "same run directory" in err


def test_bad_device_is_a_one_line_error(tmp_path, capsys):
    code, _, err = _cli(capsys, "train", "--device", "foo", "--epochs", "0", "--out", str(tmp_path / "r"))
    assert code == 2 and "--device must be a torch device" in err
    code, _, err = _cli(capsys, "study", "hyperparams", "--device", "foo", "--quick", "--jobs", "1",
                        "--no-report", "--out", str(tmp_path / "s"))
    assert code == 2 and "--device must be a torch device" in err


def test_study_refuses_a_run_directory_as_its_folder(runs, tmp_path, capsys):
    run = tmp_path / "a"
    shutil.copytree(runs / "study" / "a", run)
    before = sorted(p.name for p in run.iterdir())
    code, _, err = _cli(capsys, "study", "hyperparams", "--quick", "--jobs", "1", "--no-report", "--out", str(run))
    assert code == 2 and "is a run directory" in err
    assert sorted(p.name for p in run.iterdir()) == before


def test_resume_of_a_run_not_made_by_train_says_so(runs, tmp_path, capsys):
    run = tmp_path / "a"
    shutil.copytree(runs / "study" / "a", run)
    meta = json.loads((run / "meta.json").read_text())
    meta["config"] = {"note": "my run"}
    (run / "meta.json").write_text(json.dumps(meta))
    code, _, err = _cli(capsys, "train", "--resume", str(run))
    assert code == 2 and "not a run of `bnn-probe train`" in err


def test_compare_with_an_empty_steps_table_says_so_instead_of_nan(runs, tmp_path, capsys):
    run = tmp_path / "a"
    shutil.copytree(runs / "study" / "a", run)
    for part in (run / "steps").glob("part-*.parquet"):
        part.write_bytes(b"broken")
    code, out, _ = _cli(capsys, "compare", str(run), str(runs / "study" / "b"), "--skip-broken")
    assert code == 0 and "no per-step rows in a" in out and "nan" not in out


def test_summary_of_a_finished_run_without_readable_steps_says_so(tmp_path, capsys):
    """A finished run whose every steps part is unreadable must not be described as a live run."""
    run = make_run("r", **SMALL)
    d = write_run(run, tmp_path)
    for part in (d / "steps").glob("*.parquet"):
        part.write_bytes(b"not parquet")
    code, out, _ = _cli(capsys, "summary", str(d), "--skip-broken")
    assert code == 0 and "no per-layer rows readable" in out and "logged yet" not in out
