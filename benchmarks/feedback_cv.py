"""Spread of per-layer flip ratios along feedback chains (docs/findings.md, "The flow recommendation").

Reads the runs written by ``benchmarks/thresholds_study.py feedback`` under OUT/<config>/<dataset>/ and prints, per
configuration, method and seed, the CV (std/mean over layers) of the per-layer flip ratios averaged over the whole
run for the global-τ run and every fed round, their ratio, the mean flip ratio, the final validation accuracy and
the report's verdicts (``thresholds.recommendation``, ``.round2``, …) over the seeds given.

    python benchmarks/feedback_cv.py --out runs/fb --method flow --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

import bnn_probe
from bnn_probe.reports.feedback import feedback_chains, feedback_verdicts


def _finished(p: Path) -> bool:
    return (p / "meta.json").exists() and json.loads((p / "meta.json").read_text()).get("status") == "finished"


def chains_of(ds_dir: Path, method: str, seeds: list[int]) -> pd.DataFrame:
    """Feedback chains of one configuration and method (run folders global_s<seed>, from_<tag>[_r<k>]_s<seed>)."""
    tag = "report" if method == "ladder" else method
    runs = []
    for s in seeds:
        paths = [ds_dir / f"global_s{s}", *sorted(ds_dir.glob(f"from_{tag}_s{s}")),
                 *sorted(ds_dir.glob(f"from_{tag}_r*_s{s}"))]
        runs += [bnn_probe.load_run(p) for p in paths if _finished(p)]
    ch = feedback_chains(runs)
    acc = {r.name: float(r.train["val_accuracy"].dropna().iloc[-1]) for r in runs}
    if not ch.empty:
        ch["val_accuracy"] = ch["run"].map(lambda n: acc.get(n, float("nan")))
    return ch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--method", default="flow", choices=["ladder", "tail", "flow"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args(argv)
    pd.set_option("display.width", 200)
    for ds_dir in sorted(p for p in a.out.glob("*/*") if p.is_dir()):
        ch = chains_of(ds_dir, a.method, a.seeds)
        if ch.empty:
            continue
        print(f"## {ds_dir.parent.name} {ds_dir.name} ({a.method})")
        print(ch.drop(columns=["chain"]).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
        for v in feedback_verdicts(ch):
            lo, hi = v.interval or (float("nan"), float("nan"))
            print(f"{v.id}: {v.verdict}, {v.statistic:.3f} [{lo:.3f}, {hi:.3f}], n = {v.n} ({v.reason})")


if __name__ == "__main__":
    main()
