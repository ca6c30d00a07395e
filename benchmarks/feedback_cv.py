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


def markdown_rows(config: str, ch: pd.DataFrame) -> str:
    """| config | seed | CV global | ratio round 1 | ratio round 2 | … | accuracies | per seed, then the verdicts."""
    rounds = sorted(int(k) for k in ch["round"].unique() if k >= 1)
    lines = []
    for seed, g in ch.groupby("seed", sort=True):
        g = g.set_index("round")
        ratios = " | ".join(f"{g.loc[k, 'cv_ratio']:.2f}" if k in g.index else "—" for k in rounds)
        accs = " / ".join(f"{100 * g.loc[k, 'val_accuracy']:.1f}" for k in [0, *rounds] if k in g.index)
        lines.append(f"| {config} | {seed} | {g.loc[0, 'cv']:.2f} | {ratios} | {accs} |")
    for v in feedback_verdicts(ch):
        lo, hi = v.interval or (float("nan"), float("nan"))
        lines.append(f"| {config} | all | | {v.id}: **{v.verdict}**, {v.statistic:.2f} [{lo:.2f}, {hi:.2f}] | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--method", default="flow", choices=["ladder", "tail", "flow"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--markdown", action="store_true", help="one table row per configuration and seed")
    a = ap.parse_args(argv)
    pd.set_option("display.width", 200)
    for ds_dir in sorted(p for p in a.out.glob("*/*") if p.is_dir()):
        ch = chains_of(ds_dir, a.method, a.seeds)
        if ch.empty:
            continue
        if a.markdown:
            print(markdown_rows(f"{ds_dir.name}, {ds_dir.parent.name}", ch))
            continue
        print(f"## {ds_dir.parent.name} {ds_dir.name} ({a.method})")
        print(ch.drop(columns=["chain"]).to_string(index=False, float_format=lambda x: f"{x:.3g}"))
        for v in feedback_verdicts(ch):
            lo, hi = v.interval or (float("nan"), float("nan"))
            print(f"{v.id}: {v.verdict}, {v.statistic:.3f} [{lo:.3f}, {hi:.3f}], n = {v.n} ({v.reason})")


if __name__ == "__main__":
    main()
