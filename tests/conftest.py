"""Shared test settings: headless plotting, one torch thread (the CI machine has 2 cores), seeded RNGs."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def run_cli(argv, capsys):
    """Run ``bnn-probe`` in-process; returns (exit code, stdout, stderr). A normal return counts as exit code 0."""
    from bnn_probe.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return e.value.code, out, err
