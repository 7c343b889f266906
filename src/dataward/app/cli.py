"""The ``dataward`` command line: a thin layer over :class:`dataward.ward.Ward`.

This module builds the typer app from the commands in :mod:`dataward.app.commands` and runs it. Errors users can fix
print one line and exit 1 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

from dataward.app.commands import lifecycle, reports, serving
from dataward.app.terminal import console
from dataward.errors import DatawardError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and serve diffusion models that protect their training data.")
STATE = {"debug": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    STATE["debug"] = debug


# the order of `dataward --help`
for _command in (lifecycle.init, lifecycle.train, lifecycle.pretrain, lifecycle.guard, reports.audit, reports.sample, reports.status,
                 lifecycle.forget, lifecycle.verify, lifecycle.add, reports.demo):
    app.command()(_command)
app.add_typer(serving.keys_app, name="keys")
app.command()(serving.serve)
app.command()(serving.export)


def _print_error(message: str) -> None:
    """One unwrapped line on stderr, whatever the terminal width; the message is not read as rich markup."""
    console.print("[red]error:[/red]", escape(message), soft_wrap=True)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 1."""
    try:
        app(standalone_mode=False)
    except DatawardError as error:
        if STATE["debug"]:
            raise
        _print_error(str(error))
        sys.exit(1)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - the CLI never shows a raw traceback unless --debug
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        if STATE["debug"]:
            raise
        _print_error(f"{type(error).__name__}: {error} (run with --debug for the traceback)")
        sys.exit(1)
