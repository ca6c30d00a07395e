"""Build a report directory: analyses → tables (CSV) → figures (PNG) → verdicts.json → report.html / report.md."""

from __future__ import annotations

import datetime as _dt
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from .. import __version__
from . import (
    bop_vs_latent,
    feedback,
    hazard,
    inertia,
    pairs,
    run_warnings,
    tau_sweep,
    theorem1,
    threshold_policies,
    thresholds,
    training,
)
from . import figures as F
from . import interventions as reset_exp
from . import latent_network as latent_exp
from .answers import HOW_TO_READ, build_answers
from .atomic import report_folder
from .frames import config, run_name
from .layout import (
    MAX_OPEN_ROWS,
    compact_mapping,
    default_ids,
    group_notes,
    layers_view,
    panels,
    run_details,
    runs_view,
)
from .load import load_runs
from .render import Document, Section, render_html, render_markdown
from .stats import Verdict

FORMATS = ("html", "md")


@dataclass
class ReportOptions:
    k: int | None = None  # horizon of "flip within the next k steps" (None: 10 × tracking cadence)
    window: float = 0.5  # analysed window: the last fraction of each run's steps
    target_flip_ratio: float | None = None  # None: per run, the median layer flip ratio over the window
    chatter_min_flips: int = thresholds.CHATTER_MIN_FLIPS
    threshold_method: str = "flow"  # recommended thresholds: "flow" (flow model), "ladder" (margin ladder) or "tail"
    n_boot: int = 1000


@dataclass
class ReportResult:
    out_dir: Path
    verdicts: list[Verdict]
    warnings: list[str]
    files: list[Path] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # seconds per stage


def _n_runs(df: pd.DataFrame) -> int:
    return int(df["run"].nunique()) if "run" in df else 0


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "x"


class _Writer:
    def __init__(self, out: Path):
        self.out = out
        (out / "figures").mkdir(parents=True, exist_ok=True)
        (out / "tables").mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []
        self.figures: set[str] = set()  # figure names asked for by this build (older files in out/ do not count)

    def csv(self, name: str, df: pd.DataFrame) -> str:
        p = self.out / "tables" / f"{name}.csv"
        df.to_csv(p, index=False)
        self.files.append(p)
        return f"tables/{name}.csv"

    def fig(self, name: str) -> Path:
        self.figures.add(name)
        return self.out / "figures" / f"{name}.png"

    def drawn(self, name: str) -> Path | None:
        """The path of figure ``name`` when this build drew it (a figure file name like ``fan_in_law.png`` works)."""
        name = name.removesuffix(".png")
        p = self.out / "figures" / f"{name}.png"
        return p if name in self.figures and p.exists() else None


def build_report(runs_or_paths, out_dir, formats=FORMATS, progress: bool = True, options: ReportOptions | None = None,
                 strict: bool = True) -> Path:
    """Write a report for the given runs (run directories, folders of runs, or loaded Run objects) into ``out_dir``.

    Returns the path of ``report.html`` (or of ``out_dir`` when HTML is not among ``formats``).
    """
    res = generate(runs_or_paths, out_dir, formats, progress, options, strict)
    html = res.out_dir / "report.html"
    return html if "html" in formats else res.out_dir


def generate(runs_or_paths, out_dir, formats=FORMATS, progress: bool = True, options: ReportOptions | None = None,
             strict: bool = True) -> ReportResult:
    """Write the report into a temporary sibling of ``out_dir`` and move it into place (:mod:`.atomic`): ``out_dir``
    holds the previous report or the new one, never a mix; a write error (disk full) is one line."""
    out = Path(out_dir)
    with report_folder(out) as tmp:
        res = _generate(runs_or_paths, tmp, formats, progress, options, strict)
    res.files = [out / Path(f).relative_to(tmp) for f in res.files]
    res.out_dir = out
    return res


def _generate(runs_or_paths, out_dir, formats=FORMATS, progress: bool = True, options: ReportOptions | None = None,
              strict: bool = True) -> ReportResult:
    opt = options or ReportOptions()
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        from ..errors import BnnProbeError

        raise BnnProbeError(f"unknown report format(s) {', '.join(bad)} (choose from {', '.join(FORMATS)})")
    if isinstance(runs_or_paths, str | Path) or not hasattr(runs_or_paths, "__iter__"):
        runs_or_paths = [runs_or_paths]
    show = progress and sys.stderr.isatty()
    bar = tqdm(total=9, desc="report", unit="stage", disable=not show, leave=False)
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def stage(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - clock[0], 3)
        clock[0] = now
        bar.set_postfix_str(name)
        bar.update(1)

    runs = load_runs(runs_or_paths, strict=strict)
    runs, left_out = run_warnings.exclude_blocking(runs)  # probe warnings: docs/runlog-format.md
    stage("loaded runs")
    out = Path(out_dir)
    w = _Writer(out)
    # ---------------------------------------------------------------- analyses
    tr = training.analyse_training(runs)
    stage("training")
    fp = inertia.flip_probability(runs, k=opt.k, n_boot=opt.n_boot)
    sched = inertia.schedule_effect(runs)
    fams = inertia.family_distributions(runs)
    stage("inertia")
    pair_results, pair_notes = pairs.pair_verdicts(runs)
    stage("pairs")
    lt = thresholds.layer_table(runs, window=opt.window, chatter_min=opt.chatter_min_flips)
    # the pooled law: layers of the networks as trained with batch norm (the argument it tests), sweeps excluded
    apart = [run_name(r) for r in runs if threshold_policies.is_sweep(r) or tau_sweep.is_tau_sweep(r)
             or config(r).get("batch_norm") is False]
    law = thresholds.fan_in_law(lt[~lt["run"].isin(apart)], seeds={run_name(r): config(r).get("seed") for r in runs})
    rec = thresholds.recommended_thresholds(lt, opt.target_flip_ratio, method=opt.threshold_method,
                                            sources=feedback.sources(runs))
    stage("thresholds")
    default_ids([], pair_results, sched.verdict, law.verdicts)
    verdicts = [p.verdict for p in pair_results if p.verdict] + [sched.verdict] + law.verdicts
    warnings = list(tr.warnings) + left_out + run_warnings.messages(runs)

    # ---------------------------------------------------------------- sections
    s_runs = Section("Runs and training", anchor="runs")
    for wmsg in tr.warnings:
        s_runs.warning(wmsg)
    w.csv("runs", tr.runs)
    s_runs.table(runs_view(tr.runs), "Runs (optimizer: what trains the binary weights; τ: a range when layers "
                 "differ; accuracy: the last logged value of the metric named in the CSV's accuracy_metric)",
                 "tables/runs.csv", open=len(tr.runs) <= MAX_OPEN_ROWS)
    s_runs.figure(F.training_curves(tr.curves, w.fig("training_curves")),
                  "Accuracy and loss per run, one row per study group (a metric logged a few times is drawn as "
                  "points)")
    w.csv("training_curves", tr.curves)
    s_runs.figure(F.accuracy_vs_hyperparameters(tr.runs, w.fig("accuracy_hyperparameters")),
                  "Final accuracy of the Bop runs against γ and against τ (every Bop run with an accuracy)")
    s_runs.text("Flip ratio on the paper's log scale π_t = log(#flipped_t/#weights + e^−9) (Helwegen et al. 2019, "
                "Fig. 1); e^−9 is the floor (no flips). Curves are averaged over at most 400 step bins.")
    s_runs.figure(F.network_flip_ratio(tr.network_flips, w.fig("flip_ratio_network")),
                  "Whole-network flip ratio over time, one panel per study group, every run a line")
    w.csv("flip_ratio_network", tr.network_flips)
    panels(s_runs, F.layer_flip_ratio(tr.layer_flips, w.fig("flip_ratio_layers")),
           "Flip ratio per layer over time, every run a panel (layers coloured thin → wide)", _n_runs(tr.layer_flips))
    w.csv("flip_ratio_layers", tr.layer_flips)
    stage("figures: runs")

    s_in = Section("The inertia interpretation", anchor="inertia")
    s_in.text("Inertia is how far a weight is from flipping: |w̃| for latent weights, τ − w·m for Bop (distance of "
              "the momentum to the threshold). Descriptive: P(flip within the next k steps) by inertia decile. "
              "'Larger inertia, fewer flips' holds for any continuous state read through a threshold, so it is no "
              "test of the inertia interpretation; the verdicts are in the experiments' sections (flip hazard in "
              "steps, Theorem 1 with clipping, Bop vs latent).")
    if fp.k:
        s_in.text("Horizon k per run: " + compact_mapping(fp.k) +
                  ". Bins are inertia deciles per (run, layer); intervals: bootstrap (1000 resamples) of the "
                  "proportion in each bin resampling whole tracked weights (a weight's rows are correlated, so "
                  "weights, not rows, are the independent units). The verdict counts tracked weights, not rows.")
    for n in group_notes(fp.notes, map(run_name, runs)):
        s_in.text(n)
    s_in.figure(F.inertia_flip_probability(fp.bins, w.fig("inertia_flip_probability")),
                "P(flip within the next k steps) by inertia decile: every (run, layer) is one line, one panel per "
                "family (a summary; the bins' bootstrap intervals are in tables/inertia_bins.csv)")
    panels(s_in, F.latent_inertia(tr.latent_inertia, w.fig("latent_inertia")),
           "Latent-weight magnitude |w̃| (inertia) over time, every latent run a panel", _n_runs(tr.latent_inertia))
    w.csv("latent_inertia", tr.latent_inertia)
    s_in.table(fp.correlations, "Spearman correlation of inertia and flipping per (run, layer) (descriptive; bounded "
               "by the flip rate)",
               w.csv("inertia_correlations", fp.correlations))
    w.csv("inertia_bins", fp.bins)
    s_in.text("Pairs: runs marked as a Theorem 1 pair or a τ = 0 pair (config pair/pair_role, or a tag containing "
              "theorem1 / tau0) must have identical binary trajectories; compared exactly by the per-step sign hash "
              "of every layer. A Theorem 1 pair (a power-of-two C: a floating-point identity) is a code check without "
              "a verdict; Theorem 1 as an experiment has its own section.")
    pair_rows = []
    for p in pair_results:
        c = p.comparison
        pair_rows.append({"pair": p.pair.name, "kind": p.pair.kind, "run_a": run_name(p.pair.a),
                          "run_b": run_name(p.pair.b),
                          "verdict": p.verdict.verdict if p.verdict else "code check (no verdict)",
                          "first_difference_step": None if c is None else c.first_difference_step,
                          "steps_compared": None if c is None else c.n_steps_compared,
                          "max_hamming": None if c is None else c.max_hamming})
        if c is not None and len(c.hamming):
            name = f"hamming_{_slug(p.pair.name)}"
            s_in.figure(F.hamming(c.hamming, f"pair {p.pair.name}: Hamming distance", w.fig(name)),
                        f"Hamming distance between the binary weights of pair {p.pair.name}")
            w.csv(name, c.hamming)
    s_in.verdicts([p.verdict for p in pair_results if p.verdict])
    if not pair_results:
        s_in.text("No Theorem 1 or τ = 0 pair among these runs.")
    for n in group_notes(pair_notes, map(run_name, runs)):
        s_in.text(n)
    pair_df = pd.DataFrame(pair_rows)
    s_in.table(pair_df, "Pairs", w.csv("pairs", pair_df))
    s_in.text("Schedules: flip ratio against the learning rate (latent) or γ (Bop) in force, over 20 step windows "
              "per run. Decaying the learning rate adds inertia, so the flip ratio should fall with it; the "
              "correlation is observational (confounded with training time).")
    s_in.verdicts([sched.verdict])
    for n in inertia.ema_horizon_notes(runs):
        s_in.text(n)
    s_in.figure(F.schedule_scatter(sched.table, w.fig("schedule")), "Flip ratio against the lr / γ in force")
    w.csv("schedule", sched.table)
    w.csv("schedule_correlations", sched.correlations)
    s_in.figure(F.family_distributions(fams.flip_ratio, fams.inertia, w.fig("families")),
                "Bop against latent-weight runs: flip ratio per step and inertia of the tracked weights")
    s_in.table(fams.summary, "Distributions per family", w.csv("family_distributions", fams.summary))
    stage("figures: inertia")

    s_th = Section("Per-layer threshold needs", anchor="thresholds")
    n_bop = _n_runs(lt[lt["family"] != "latent"]) if "family" in lt else _n_runs(lt)
    panels(s_th, F.quantile_ranges(lt, w.fig("abs_m_over_tau"), "abs_m_rel", "|m|/τ per layer (Bop families)",
                                   "|m| / τ (q05–q95, q25–q75, median)"),
           "Distribution of |m|/τ per layer, every Bop-family run a panel (log axis)", n_bop)
    panels(s_th, F.quantile_ranges(lt, w.fig("abs_latent"), "abs_w", "|w̃| per layer (latent)",
                                   "|w̃| (q05–q95, q25–q75, median)"),
           "Distribution of |w̃| per layer, every latent run a panel (log axis)", _n_runs(lt) - n_bop)
    panels(s_th, F.never_chatter(lt, w.fig("never_chatter")),
           f"Share of weights that never flipped, and that flipped ≥ {opt.chatter_min_flips} times (chatter), "
           "every run a panel", _n_runs(lt))
    s_th.table(layers_view(lt), f"Per-layer summary over the last {opt.window:.0%} of each run (main columns; "
               "all in the CSV)", w.csv("layers", lt))
    s_th.text("The fan-in law: with batch norm after a layer of fan-in n, the gradient per binary weight and so |m| "
              "scale like n^−0.5 (the batch-norm argument for Bop's threshold). Pooled over the layers of the "
              "networks as trained with batch norm (sweep and no-batch-norm runs excluded), with the layer as the "
              "unit: per layer the mean of the log over the network's runs, then OLS on log fan_in with an "
              "intercept per network; t-intervals with df = #layers − #networks − 1. This pooled slope mixes "
              "width with depth and fan-out (a network's wide layer is also at a particular depth, with a "
              "particular fan-out), so it does not answer \"does a wider layer need a smaller τ?\": the controlled "
              "width sweep (section 3b) does, when the runs include it.")
    s_th.verdicts(law.verdicts)
    s_th.figure(F.fan_in_law(law.points, law.fit, w.fig("fan_in_law")),
                "Median |m| and flip ratio against fan-in (log–log), one row per family, fitted slopes (grey) and "
                "the −0.5 reference (dashed)")
    s_th.table(law.slopes.drop(columns=["method"], errors="ignore"), "Fan-in law slopes",
               w.csv("fan_in_law_slopes", law.slopes))
    w.csv("fan_in_law_points", law.points)
    s_th.figure(F.thresholds_over_time(tr.thresholds, w.fig("thresholds_over_time")),
                "Per-layer thresholds τ_l(t) of the runs whose τ changes during training (the calibrated policy's "
                "flip-ratio controller)")
    w.csv("thresholds_over_time", tr.thresholds)
    tcols = ["layer", "fan_in", "n_weights", "flip_ratio", "recommended_threshold", "run", "family", "threshold",
             "ratio_to_current", "bound", "elasticity", "elasticity_at_recommended", "mean_overshoot", "margin_sd",
             "method"]
    rtab = rec.table[tcols]
    tgt = compact_mapping(rec.target, "{:.3g}")
    if len(tgt) > 200:  # many runs: the range here, each run's target in a table
        vals = [float(v) for v in rec.target.values()]
        targets = pd.DataFrame({"run": list(rec.target), "target_flip_ratio": vals})
        tgt = f"{min(vals):.3g} to {max(vals):.3g}, each run's in {w.csv('recommended_targets', targets)}"
    s_th.text("Recommended per-layer thresholds: the τ that would give each layer the target flip ratio "
              f"(target per run: {tgt or '—'}). " + rec.method)
    s_th.figure(F.thresholds(rec.table, w.fig("thresholds")),
                "Recommended (dots) and current (crosses) thresholds against fan-in, one panel per family")
    s_th.table(rtab, "Recommended thresholds", w.csv("thresholds", rtab))
    s_th.code(rec.snippet, "Ready-to-paste parameter groups", lang="python")
    stage("figures: thresholds")

    # Report parts of further experiments: each module's ``section(runs, w, opt) -> (Section | None, verdicts)``.
    extra_sections: list[Section] = []
    s_pol, pol_verdicts = threshold_policies.section(runs, w, opt)  # None unless policies/sweep
    default_ids([], [], None, pol_verdicts)
    verdicts = verdicts + pol_verdicts
    s_tau, tau_verdicts = tau_sweep.section(runs, w, opt)  # None unless one-layer τ sweep runs
    verdicts = verdicts + tau_verdicts
    s_fb, fb_verdicts = feedback.section(runs, w, opt)  # None unless from-report feedback chains
    s_reset, v_reset = reset_exp.section(runs, w, opt)  # magnitude-reset pairs (None without them)
    s_latent, v_latent = latent_exp.section(runs, w, opt)  # latent network of latent-weight runs
    s_t1, v_t1 = theorem1.section(runs, w, opt)  # Theorem 1 with C ∈ {3, 10, 100}, with and without clipping
    s_hz, v_hz = hazard.section(runs, w, opt)  # flip hazard against inertia in steps
    s_bl, v_bl = bop_vs_latent.section(runs, w, opt)  # Bop vs latent Adam from the same initial signs
    verdicts = verdicts + fb_verdicts + v_reset + v_latent + v_t1 + v_hz + v_bl
    inertia_sections = [s for s in (s_reset, s_latent, s_t1, s_hz, s_bl) if s is not None]
    if s_pol is not None:
        extra_sections.append(s_pol)
    if s_tau is not None:
        extra_sections.append(s_tau)
    if s_fb is not None:
        extra_sections.append(s_fb)
    if w.drawn("width_sweep") is None:  # unless a section drew it, the controlled sweep's figure
        sweep = threshold_policies.width_sweep(runs, opt.window)
        if s_pol is not None:
            s_pol.figure(F.width_sweep(sweep.points, w.fig("width_sweep")),
                         "Controlled width sweep: the layer after the varied width W, every seed a line")

    s_app = run_details(runs, out, w.csv)
    sections = [s_runs, s_in, *inertia_sections, s_th, *extra_sections, s_app]
    for i, sec in enumerate(sections, 1):  # numbered in reading order
        sec.title = f"{i}. " + re.sub(r"^\d+[a-z]?\.\s*", "", sec.title)

    vtab = pd.DataFrame([v.to_json() for v in verdicts])
    w.csv("verdicts", vtab)
    (out / "verdicts.json").write_text(json.dumps([v.to_json() for v in verdicts], indent=1, default=str) + "\n")
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = Document(title="bnn-probe report", subtitle=f"{len(runs)} run(s) · bnn-probe {__version__} · {now}",
                   warnings=warnings, verdicts=verdicts, sections=sections,
                   answers=build_answers(verdicts, w.drawn), how_to_read=HOW_TO_READ)
    if "html" in formats:
        (out / "report.html").write_text(render_html(doc), encoding="utf-8")
    if "md" in formats:
        (out / "report.md").write_text(render_markdown(doc, out), encoding="utf-8")
    stage("rendered")
    bar.close()
    return ReportResult(out, verdicts, warnings, w.files, timings)


