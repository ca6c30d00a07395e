"""Only the one-layer τ sweep of ``bnn-probe study thresholds`` (same runs, same names), then a report on them.

    python benchmarks/tau_sweep.py --out runs/tau_sweep_mnist1d --dataset mnist1d --model cnn1d --epochs 6 --seeds 0,1,2

``bnn-probe study thresholds`` trains the same sweep alongside the policy runs and the width sweep; this script is
for when only the sweep is wanted (docs/findings.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bnn_probe.reports import build_report
from bnn_probe.studies import StudyOptions, _existing, _run_one, parse_seeds, plan_study
from bnn_probe.train import parse_widths


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--widths", default="256,256")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    opts = StudyOptions(dataset=a.dataset, model=a.model, epochs=a.epochs, seeds=parse_seeds(a.seeds), quick=a.quick,
                        widths=parse_widths(a.widths) if a.model == "mlp" else ())
    specs = [s for s in plan_study("thresholds", opts) if s.name.startswith("tau-sweep")]
    for s in specs:
        if _existing(a.out / s.name, s.config) != "same":
            _run_one(s.name, s.config.to_dict(), str(a.out / s.name), True, False)
    print(build_report([a.out / s.name for s in specs], a.out / "report", progress=False))


if __name__ == "__main__":
    main()
