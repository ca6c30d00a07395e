"""``bnn-probe study NAME --out DIR``: a named grid of runs side by side in DIR, then a report in DIR/report/."""

from __future__ import annotations

import click

from ..errors import BnnProbeError


class _StudyHelp(click.Command):
    """Lists the registered studies in ``--help`` (imports the registry only when help is asked for)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from ..studies import STUDIES

        rows = [(name, st.description + (f" [not available yet: {st.reserved}]" if st.reserved else ""))
                for name, st in STUDIES.items()]
        rows.append(("all", "the main job: a short version of every available study, one report"))
        with formatter.section("Studies"):
            formatter.write_dl(rows)


@click.command("study", cls=_StudyHelp)
@click.argument("name", metavar="NAME")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Study folder: one run directory per run, and report/.")
@click.option("--dataset", default="digits", show_default=True, metavar="[digits|mnist1d|cifar10]",
              help="Dataset of every run.")
@click.option("--data-dir", default=None, type=click.Path(path_type=str), help="CIFAR-10 folder.")
@click.option("--model", default="mlp", show_default=True, metavar="[mlp|binarynet|cnn1d]",
              help="Reference model of every run.")
@click.option("--widths", default="256,256", show_default=True, help="MLP hidden widths.")
@click.option("--epochs", type=int, default=None,
              help="Epochs per run [default: the study's (hyperparams/inertia 20, thresholds 10); inside 'all' "
                   "6/6/4; 2 with --quick].")
@click.option("--seeds", default=None,
              help="Comma-separated seeds; every grid point per seed [default: 0,1,2 for inertia (its verdicts need "
                   "three seeds), 0 otherwise].")
@click.option("--jobs", type=int, default=0, show_default=True,
              help="Runs trained in parallel processes, each with cpu_count/jobs torch threads (0 = one process "
                   "per CPU core; 1 = in this process).")
@click.option("--quick", is_flag=True, help="CI-sized version: 2 epochs per run, no histograms.")
@click.option("--device", default="cpu", show_default=True, help="torch device of every run.")
@click.option("--overwrite", is_flag=True, help="Replace runs in --out that differ from the study's.")
@click.option("--no-report", is_flag=True, help="Train only; build no report.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: only on a terminal].")
def study(name, out, dataset, data_dir, model, widths, epochs, seeds, jobs, quick, device, overwrite, no_report,
          progress):
    """Run study NAME (hyperparams, inertia, thresholds, all) into --out and report it.

    Finished runs already in --out with the same options are reused, so an interrupted study resumes.
    """
    from ..studies import StudyOptions, default_seeds, parse_seeds, run_study
    from ..train import parse_widths

    if epochs is not None and epochs < 0:
        raise BnnProbeError(f"--epochs must be a non-negative integer, got {epochs}")
    seed_list = parse_seeds(seeds) if seeds is not None else default_seeds(name)
    opts = StudyOptions(dataset=dataset, epochs=epochs, seeds=seed_list, quick=quick, data_dir=data_dir,
                        model=model, widths=parse_widths(widths) if model == "mlp" else (), device=device)
    if jobs is None or jobs < 0:
        raise BnnProbeError(f"--jobs must be a non-negative integer (0 = one per CPU core), got {jobs}")
    path = run_study(name, out, opts, jobs=jobs, progress=progress, overwrite=overwrite, report=not no_report,
                     echo=lambda s: click.echo(s, err=True))
    click.echo(str(path))
