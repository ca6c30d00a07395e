"""Layout helpers of a report: the columns a page shows, the configuration table, the collapsed per-run detail,
and the stable ids of the verdicts of the built-in analyses.

They select and arrange prepared tables (no statistics). ``tables/*.csv`` always keep every column; the page shows
the main ones so that tables fit its width.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from .frames import meta, run_name
from .render import Section
from .stats import Verdict

RUNS_COLUMNS = {"run": "run", "optimizer": "optimizer", "model": "model", "dataset": "dataset", "gamma": "γ",
                "threshold": "τ", "lr": "lr", "seed": "seed", "steps": "steps",
                "final_train_accuracy": "train acc.", "final_val_accuracy": "held-out acc.", "status": "status"}
LAYERS_COLUMNS = {"run": "run", "layer": "layer", "fan_in": "fan-in", "n_weights": "weights", "threshold": "τ",
                  "flip_ratio": "flip ratio", "abs_m_q50": "median |m|", "abs_m_rel_q50": "median |m|/τ",
                  "abs_w_q50": "median |w̃|", "never_flipped": "never flipped", "chattering": "chatter"}
# config keys that never tell runs apart in a table (their values are in meta.json)
_CONFIG_SKIP = ("device", "data_dir")


MAX_OPEN_PANELS = 12  # a figure with more per-run panels is shown collapsed under its caption
MAX_OPEN_ROWS = 30  # the runs table is shown open up to this many runs
MAX_OPEN_GROUP_ROWS = 8  # a study group's table of differing options likewise


def panels(section: Section, path: Path | None, caption: str, n_panels: int) -> None:
    """A figure with one panel per run: shown open when it has at most MAX_OPEN_PANELS panels, else collapsed under
    its caption (every run stays drawn; the page stays short)."""
    if path is None:
        return
    if n_panels > MAX_OPEN_PANELS:
        section.details(f"{caption} ({n_panels} panels; click to show)").figure(path, caption)
    else:
        section.figure(path, caption)


def default_ids(inertia_v: list[Verdict], pair_results, sched: Verdict | None, law: list[Verdict]) -> None:
    """Give the built-in analyses' verdicts their stable ids where their module has not set one (in place)."""
    for v in inertia_v:
        v.id = v.id or "inertia.flip_probability"
    for p in pair_results:
        if p.verdict is not None:  # a pair that is a code check carries no verdict
            p.verdict.id = p.verdict.id or ("tau0.equivalence" if p.pair.kind == "tau0" else f"{p.pair.kind}.pair")
    if sched is not None:
        sched.id = sched.id or "schedules.flip_ratio"
    for v in law:
        if v.id:
            continue
        c = v.claim
        if c.startswith("Controlled width sweep"):
            v.id = "thresholds.fan_in_controlled" + ("_prediction" if "scales like" in c else "")
        elif c.startswith("Wide layers need"):
            v.id = "thresholds.fan_in_pooled"
        elif c.startswith("|m| scales like"):
            v.id = "thresholds.fan_in_pooled_prediction"
        elif c.startswith("Under one threshold"):
            v.id = "thresholds.one_tau_wide_flip_less"
        elif v.section == "thresholds" or "policy" in c.lower() or "threshold" in c.lower():
            v.id = "thresholds.policies"


def _view(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    keep = [c for c in columns if c in df.columns and not df[c].isna().all()]
    out = df[keep].rename(columns=columns)
    for c in out.columns:  # a column with one value in every row says nothing per run: drop it (the CSV keeps it)
        if len(out) > 1 and out[c].astype(str).nunique() == 1 and c not in ("run", "status"):
            out = out.drop(columns=c)
    return out


def runs_view(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs table as the page shows it: the main columns, short headers, constant columns left to the CSV."""
    return _view(runs, RUNS_COLUMNS)


def layers_view(layers: pd.DataFrame) -> pd.DataFrame:
    return _view(layers, LAYERS_COLUMNS)


def group_notes(notes: list[str], names) -> list[str]:
    """Notes of the form ``"<run>: <message>"`` with one message for several runs become one note naming the runs
    (``"<message>: a, b, c"``); other notes are kept as they are, in order."""
    names = {str(n) for n in names}
    by: dict[str, list[str]] = {}
    out: list[str | tuple[str]] = []
    for n in notes:
        run, sep, msg = n.partition(": ")
        if sep and run in names:
            if msg not in by:
                out.append((msg,))
            by.setdefault(msg, []).append(run)
        else:
            out.append(n)
    return [x if isinstance(x, str) else
            (f"{by[x[0]][0]}: {x[0]}" if len(by[x[0]]) == 1 else f"{x[0]} ({len(by[x[0]])} runs): "
             + ", ".join(by[x[0]])) for x in out]


def compact_mapping(d: dict, spec: str = "{}") -> str:
    """``{run: value}`` as text, runs with one value named together: ``10 (all 24 runs)`` or ``a, b: 10; c: 20``."""
    if not d:
        return ""
    by: dict[str, list[str]] = {}
    for k, v in d.items():
        by.setdefault(spec.format(v), []).append(str(k))
    if len(by) == 1:
        (v, ks), = by.items()
        return f"{v} (all {len(ks)} runs)"
    return "; ".join(f"{', '.join(ks)}: {v}" for v, ks in by.items())


def _short(v) -> str:
    if v is None:
        return "—"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else v
    return out


def config_differences(runs) -> tuple[list[tuple[str, pd.DataFrame, dict[str, object]]], dict[str, object]]:
    """Per run group (the tag, i.e. the study that made the runs): (group, runs × the options that differ inside
    the group, the options the group's runs share but other runs do not), and the options every run shares.
    ``extra`` entries are shown without their prefix, except what a threshold policy recorded (its per-layer τ, in
    meta.json)."""
    from .training import run_group

    flats = [{k.removeprefix("extra."): v for k, v in _flatten(meta(r).get("config") or {}).items()
              if k not in _CONFIG_SKIP and not k.startswith("extra.threshold_policy")} for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))

    def differs(fs: list[dict]) -> list[str]:
        return [k for k in keys if len({json.dumps(f.get(k), default=str) for f in fs}) > 1]

    everywhere = differs(flats)
    shared = {k: flats[0].get(k) for k in keys if k not in everywhere} if flats else {}
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(run_group(r), []).append(i)
    out = []
    for g, idx in groups.items():
        fs = [flats[i] for i in idx]
        inside = differs(fs)
        table = pd.DataFrame([{"run": run_name(runs[i]), **{k: flats[i].get(k) for k in inside}} for i in idx])
        common = {k: fs[0].get(k) for k in everywhere if k not in inside}
        out.append((g, table, common))
    return out, shared


def run_details(runs, out: Path, csv) -> Section:
    """The last section: the options that differ between runs (a table), the shared ones (one line), and per run a
    collapsed block with its facts and its full meta.json (HTML: inline; Markdown: a link to the file)."""
    sec = Section("Runs in detail: configurations and versions", anchor="appendix")
    from .build import _slug  # (build imports this module)

    groups, shared = config_differences(runs)
    for g, table, common in groups:
        line = ", ".join(f"{k} = {_short(v)}" for k, v in common.items() if v is not None and k != "tag")
        sec.text(f"{g} ({len(table)} run(s)): " + (line or "no option beyond those shared by every run") + ".")
        if len(table.columns) > 1:
            sec.table(table, f"{g}: options that differ between its runs", csv(f"config_{_slug(g)}", table),
                      open=len(table) <= MAX_OPEN_GROUP_ROWS)
    if shared:
        sec.text("Shared by every run: " + ", ".join(f"{k} = {_short(v)}" for k, v in shared.items()) + ".")
    every = sec.details(f"Each run's facts and meta.json ({len(runs)} runs)")
    for run in runs:
        m = meta(run)
        path = getattr(run, "path", None)
        facts = (f"status {m.get('status', '—')}, family {m.get('family', '—')}, last step {m.get('last_step', '—')}, "
                 f"bnn-probe {m.get('bnn_probe_version', '—')}, torch {m.get('torch_version', '—')}, "
                 f"python {m.get('python_version', '—')}" + (f"; folder {path}" if path else ""))
        d = every.details(f"{run_name(run)}")
        d.text(facts)
        keep = {k: m.get(k) for k in ("status", "family", "last_step", "bnn_probe_version", "torch_version",
                                      "python_version", "versions", "optimizer", "model", "config", "tag", "probe")
                if k in m}
        d.code(json.dumps(keep, indent=1, default=str), "meta.json (main keys)", lang="json", only="html")
        if path is not None:
            rel = os.path.relpath(Path(path) / "meta.json", out)
            d.link(f"{run_name(run)}/meta.json", Path(rel).as_posix(), only="md")
    return sec
