"""The ``bnn-probe`` command line: a click group whose subcommands live in :mod:`bnn_probe.commands`.

Subcommands are imported lazily so that ``bnn-probe --help`` starts without importing torch.
Errors from bad input (:class:`bnn_probe.errors.BnnProbeError`) and from the file system (``OSError``: disk full,
permissions) are printed as one line, without terminal control characters, and exit with code 2; no traceback
reaches the user.
"""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__

# command name -> (module under bnn_probe.commands, attribute, one-line help shown in `bnn-probe --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("train", "train", "Train one reference model with the probe attached."),
    "study": ("study", "study", "Run a named grid of runs (a study) and report it."),
    "report": ("report", "report", "Turn run logs into an HTML/Markdown report with verdicts."),
    "compare": ("report", "compare", "Compare the binary-weight trajectories of two runs."),
    "summary": ("report", "summary", "Print a terminal summary of one run."),
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when that subcommand is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._module_exists(name)]

    @staticmethod
    def _module_exists(name: str) -> bool:
        return importlib.util.find_spec(f"bnn_probe.commands.{COMMANDS[name][0]}") is not None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS or not self._module_exists(cmd_name):
            return None
        module, attr, _ = COMMANDS[cmd_name]
        return getattr(importlib.import_module(f"bnn_probe.commands.{module}"), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="bnn-probe")
def cli() -> None:
    """bnn-probe: diagnose how binarized neural networks are optimized.

    Record per-layer flips, Bop momentum against its threshold and latent-weight inertia during training,
    then test the inertia interpretation and the per-layer threshold question with statistics.
    """


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the click group, turning bad-input errors into one line and exit code 2."""
    from .errors import BnnProbeError

    try:
        cli.main(args=argv, prog_name="bnn-probe", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except (BnnProbeError, OSError) as e:  # bad input, or the disk (full, unwritable): one line, exit 2
        click.echo(f"Error: {_one_line(e)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


def _one_line(e: BaseException) -> str:
    """The error's message on one line, without terminal control characters (it may quote a run folder's names)."""
    from .safe_text import terminal_safe

    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror + (f": {e.filename}" if e.filename else "")
    else:
        msg = str(e)
    return terminal_safe(msg, one_line=True)


if __name__ == "__main__":  # pragma: no cover
    main()
