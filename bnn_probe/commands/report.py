"""``bnn-probe report``, ``bnn-probe compare`` and ``bnn-probe summary``."""

from __future__ import annotations

import functools
import json
import math
import sys
import warnings
from pathlib import Path

import click

from ..errors import BnnProbeError
from ..safe_text import terminal_safe


def _formats(value: str) -> tuple[str, ...]:
    from ..reports import FORMATS

    fmts = tuple(f.strip().lower() for f in value.split(",") if f.strip())
    bad = [f for f in fmts if f not in FORMATS]
    if not fmts or bad:
        raise BnnProbeError(f"--format takes a comma-separated list of {', '.join(FORMATS)}, got {value!r}")
    return fmts


def _warn_unfinished(runs) -> None:
    for r in runs:
        st = getattr(r, "status", "unknown")
        if st != "finished":
            click.echo(terminal_safe(f"Warning: run {r.name} did not finish (status: {st}, last step "
                                     f"{r.meta.get('last_step')}); reported up to its last flush."), err=True)


@click.command("report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Report directory to write (report.html, report.md, figures/, tables/, verdicts.json).")
@click.option("--format", "fmt", default="html,md", show_default=True, help="Comma-separated: html, md.")
@click.option("--k", "k", type=int, default=None,
              help="Horizon of 'flip within the next k steps' [default: 10 x the tracking cadence].")
@click.option("--window", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True,
              help="Analysed window: the last fraction of each run's steps (per-layer and threshold sections).")
@click.option("--target-flip-ratio", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Target of the recommended thresholds [default: per run, the median layer flip ratio].")
@click.option("--threshold-method", type=click.Choice(["flow", "ladder", "tail"]), default="flow", show_default=True,
              help="How the recommended thresholds are computed: by the flow model (flip ratio = pace / (2·(distance "
                   "to τ + mean overshoot)), overshoot from the margin ladder; for a fed run whose source run is in "
                   "the report, the secant through both), by reading the margin ladder, or by tail matching of the "
                   "|m| quantiles; tail matching for logs without the ladder (docs/reports.md).")
@click.option("--skip-broken", is_flag=True, help="Skip unreadable Parquet parts (with a warning) instead of failing.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def report(runs, out, fmt, k, window, target_flip_ratio, threshold_method, skip_broken, quiet):
    """Turn run logs (RUN_OR_FOLDER...: run directories or folders holding runs) into a report with verdicts."""
    from ..reports import ReportOptions, generate
    from ..reports.load import load_runs

    formats = _formats(fmt)
    if k is not None and k < 1:
        raise BnnProbeError(f"--k must be a positive number of steps, got {k}")
    loaded = load_runs(runs, strict=not skip_broken)
    _warn_unfinished(loaded)
    opts = ReportOptions(k=k, window=window, target_flip_ratio=target_flip_ratio, threshold_method=threshold_method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        res = generate(loaded, out, formats, progress=not quiet, options=opts, strict=not skip_broken)
    counts = {}
    for v in res.verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    summary = ", ".join(f"{n} {v}" for v, n in counts.items())
    main = res.out_dir / ("report.html" if "html" in formats else "report.md")
    click.echo(terminal_safe(f"Wrote {main} ({len(loaded)} run(s); verdicts: {summary or 'none'})"))


def _snapshot_cadence(run) -> str:
    every = ((run.meta.get("probe") or {}).get("snapshot_every") or {})
    n = every.get("n") if isinstance(every, dict) else every
    return f"every {n} steps" if n else "at the probe's snapshot cadence"


def hamming_note(a, b, c) -> str | None:
    """Why a comparison has no Hamming distance (``None`` when it has one): the runs share no snapshot step."""
    if len(c.hamming):
        return None
    from ..reports.frames import frame

    parts = []
    for r in (a, b):
        snaps = frame(r, "snapshots")
        steps = sorted({int(s) for s in snaps["step"]}) if "step" in snaps else []
        last = r.meta.get("last_step")
        parts.append(f"{r.name}: {len(steps)} snapshot(s)" + (f" at steps {', '.join(map(str, steps[:5]))}"
                                                                if steps else "")
                     + f" (snapshots {_snapshot_cadence(r)}; {last if last is not None else '?'} steps)")
    return ("no Hamming distance: the runs share no snapshot step (" + "; ".join(parts) + "). The first differing "
            "step above comes from the per-step sign hashes; for Hamming distances train with a snapshot cadence "
            "below the run length (bnn-probe train --snapshot-every N, or attach(..., snapshot_every=N)).")


@click.command("compare")
@click.argument("run_a", type=click.Path(path_type=str))
@click.argument("run_b", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.option("--skip-broken", is_flag=True, help="Skip unreadable Parquet parts instead of failing.")
def compare(run_a, run_b, as_json, skip_broken):
    """Compare the binary-weight trajectories of two runs of one architecture.

    The first differing step comes from the per-step sign hashes; Hamming distances need sign snapshots at steps
    both runs share (a note says so when there are none, e.g. runs shorter than --snapshot-every).
    """
    from ..reports import compare_runs
    from ..reports.load import load_runs, unique_names

    tables = ("layers", "steps", "snapshots")
    a = load_runs([run_a], tables, strict=not skip_broken)
    b = load_runs([run_b], tables, strict=not skip_broken)
    if len(a) != 1 or len(b) != 1:
        raise BnnProbeError("compare takes two run directories (not folders of several runs)")
    unique_names([a[0], b[0]])  # s1/x and s2/x are not both called x
    if Path(a[0].path).resolve() == Path(b[0].path).resolve():  # allowed (a sanity check), but never silently
        click.echo(terminal_safe(f"Warning: RUN_A and RUN_B are the same run directory ({a[0].path}): the "
                                 "comparison is trivially identical; give two different runs"), err=True)
    c = compare_runs(a[0], b[0])
    note = hamming_note(a[0], b[0], c)
    if note:
        c.notes.append(note)
    if as_json:
        click.echo(json.dumps(c.to_json(), indent=1))
        return
    _warn_unfinished([a[0], b[0]])
    t = functools.partial(terminal_safe, one_line=True)
    click.echo(f"{t(c.run_a)} vs {t(c.run_b)}: {c.n_steps_compared} common steps with sign hashes")
    if c.n_compared == 0:
        click.echo("  no step to compare (no sign_hash in the common steps)")
    elif c.first_difference_step is None:
        click.echo("  binary weights identical at every compared step")
    else:
        click.echo(f"  first step at which the binary weights differ: {c.first_difference_step}")
        for layer, s in sorted(c.first_difference_by_layer.items(), key=lambda kv: kv[1]):
            click.echo(f"    {t(layer)}: from step {s}")
    if len(c.hamming):
        click.echo(f"  Hamming distance (snapshots): max {c.max_hamming} weights")
        last = c.hamming[c.hamming["step"] == c.hamming["step"].max()]
        for r in last.itertuples(index=False):
            click.echo(f"    step {r.step} {t(r.layer)}: {r.hamming} ({r.fraction:.2%})")
    for n in c.notes:
        click.echo(f"  note: {t(n)}")


def _f(x, spec: str) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "—"
    return "—" if math.isnan(x) else format(x, spec)


@click.command("summary")
@click.argument("run", type=click.Path(path_type=str))
@click.option("--skip-broken", is_flag=True, help="Skip unreadable Parquet parts instead of failing.")
def summary(run, skip_broken):
    """Print a terminal table of one run: status, steps, accuracy, per-layer flip ratios, the probe's warnings.

    The optimizer is named by what trains the binary weights (bop, bop2nd, latent-adam, latent-sgd, ...); accuracy
    is the last value of the first metric logged under one of the names val_accuracy, val_acc, valid_accuracy,
    validation_accuracy, test_accuracy, test_acc, accuracy, acc, top1, val_top1, test_top1 (train: train_accuracy,
    train_acc, train_top1).
    """
    from ..reports import training
    from ..reports.frames import frame
    from ..reports.load import load_runs
    from ..reports.thresholds import layer_table

    runs = load_runs([run], ("layers", "steps", "train", "weight_flips"), strict=not skip_broken)
    if len(runs) != 1:
        raise BnnProbeError(f"{run} holds {len(runs)} runs: give one run directory")
    r = runs[0]
    table, warns = training.runs_table(runs)
    row = table.iloc[0]
    out = sys.stdout
    t = functools.partial(terminal_safe, one_line=True)  # names and values come from the run folder: untrusted
    click.echo(f"run       {t(row['run'])}  ({t(getattr(r, 'path', ''))})", file=out)
    click.echo(f"status    {t(row['status'])}" + ("" if row["status"] == "finished" else "   ⚠ did not finish"))
    click.echo(f"family    {t(row['family'])}  optimizer {t(row['optimizer'])}  model {t(row['model'])}  "
               f"dataset {t(row['dataset'] or '—')}")
    click.echo(f"steps     {row['steps']}")
    metric = row["accuracy_metric"] or "held-out"
    click.echo(f"accuracy  train {_f(row['final_train_accuracy'], '.4f')}  {metric} "
               f"{_f(row['final_val_accuracy'], '.4f')}")
    click.echo(f"τ         {_f(row['threshold'], '.3g') if not isinstance(row['threshold'], str) else row['threshold']}"
               f"  γ {_f(row['gamma'], '.3g')}  lr {_f(row['lr'], '.3g')}")
    _probe_warnings(r)
    steps = frame(r, "steps")
    if steps.empty:
        click.echo("no per-layer rows logged yet" if row["status"] == "running" else
                   "no per-layer rows readable (nothing logged, or its parts were skipped as unreadable)")
        return
    lt = layer_table(runs, window=1.0)
    last = layer_table(runs, window=0.1)
    last = last.set_index("layer")["flip_ratio"]
    click.echo("")
    head = f"{'layer':<28} {'fan_in':>7} {'weights':>9} {'flip ratio':>11} {'last 10%':>10} {'never':>7} {'chatter':>8}"
    click.echo(head)
    click.echo("-" * len(head))
    for x in lt.itertuples(index=False):
        click.echo(f"{t(str(x.layer))[:28]:<28} {_f(x.fan_in, '.0f'):>7} {_f(x.n_weights, '.0f'):>9} "
                   f"{_f(x.flip_ratio, '.3e'):>11} {_f(last.get(x.layer), '.3e'):>10} "
                   f"{_f(x.never_flipped, '.1%'):>7} {_f(x.chattering, '.1%'):>8}")
    for w in warns:
        click.echo(f"Warning: {t(w)}", err=True)


def _probe_warnings(run) -> None:
    """The probe's run checks from meta.json (docs/runlog-format.md), one line each."""
    from ..reports.run_warnings import BLOCKING, run_warnings

    t = functools.partial(terminal_safe, one_line=True)  # the run folder is untrusted
    for w in run_warnings(run):
        tag = "excluded from report verdicts" if w["kind"] in BLOCKING else "flagged in reports"
        click.echo(f"Warning: probe check {t(str(w['kind']))} ({tag}): {t(str(w.get('layer', '?')))}: "
                   f"{t(str(w.get('message', '')))}", err=True)
