"""The ``dataward`` command line: a thin layer over :class:`dataward.ward.Ward`.

This module builds the typer app from the commands in :mod:`dataward.app.commands` and runs it. Errors users can fix
print one line and exit 1 (a traceback only with ``--debug``); SIGINT (Ctrl-C) and SIGTERM exit 130 and 143 with one
line saying what was kept and how to resume (:mod:`dataward.interrupts`).
"""

from __future__ import annotations

import signal
import sys
import traceback

import click
import typer
from rich.markup import escape

from dataward.app.commands import images, inspection, lifecycle, serving
from dataward.app.terminal import console
from dataward.errors import DatawardError
from dataward.interrupts import SIGNALS, Interrupted, raise_interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="Train and serve diffusion models that protect their training data.")
STATE = {"debug": False}


def _print_version(asked: bool) -> None:
    if asked:
        import dataward

        print(f"dataward {dataward.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors (accepted anywhere on the line)."),
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."),
) -> None:
    STATE["debug"] = STATE["debug"] or debug


# the order of `dataward --help`
for _command in (lifecycle.init, lifecycle.train, lifecycle.pretrain, lifecycle.guard, inspection.audit, images.sample, inspection.samples,
                 inspection.status, lifecycle.forget, lifecycle.verify, lifecycle.add, images.demo):
    app.command()(_command)
app.add_typer(serving.keys_app, name="keys")
app.add_typer(serving.ledger_app, name="ledger")
app.command()(serving.serve)
app.command()(serving.export)


def _print_error(message: str) -> None:
    """One unwrapped line on stderr, whatever the terminal width; the message is not read as rich markup."""
    console.print("[red]error:[/red]", escape(message), soft_wrap=True)


def _usage_error(error: Exception) -> bool:
    """Whether ``error`` is click's usage or parameter error (typer >= 0.20 vendors click: its own classes)."""
    vendored = getattr(typer, "TyperException", ())
    return isinstance(error, click.ClickException) or (isinstance(error, vendored) and hasattr(error, "show"))


def interrupted_line(stop: Interrupted) -> str:
    """The one line an interrupted command prints: the signal, what the work kept, how to resume."""
    kept = "; ".join(reversed(getattr(stop, "__notes__", []))) or "nothing of this command's work was kept"
    resume = f"; resume with `dataward train {stop.ward}`" if stop.ward else ""
    return f"interrupted by {signal.Signals(stop.signum).name}: {kept}{resume}"


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 1; usage errors print click's usage line
    and a "Try --help" hint and exit 2; SIGINT and SIGTERM exit 130 and 143 with :func:`interrupted_line`. ``--debug`` is
    accepted anywhere before ``--``."""
    args = sys.argv[1:]
    cut = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:cut]:
        STATE["debug"] = True
        args = [a for a in args[:cut] if a != "--debug"] + args[cut:]
    previous = {signum: signal.signal(signum, raise_interrupted) for signum in SIGNALS}
    try:
        _run(args)
    finally:  # a caller in this process (a test) gets its handlers back
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(args: list[str]) -> None:
    """:func:`main`'s body: the app on ``args``, each way it can end turned into an exit code and at most one line."""
    try:
        code = app(args=args, prog_name="dataward", standalone_mode=False)  # typer.Exit(n) comes back as n here
        if isinstance(code, int) and code:
            sys.exit(code)
    except Interrupted as stop:
        if STATE["debug"]:
            traceback.print_exc()
        console.print(escape(interrupted_line(stop)), soft_wrap=True, highlight=False)
        sys.exit(stop.exit_code)
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
        if _usage_error(error):
            error.show()
            sys.exit(error.exit_code)
        if STATE["debug"]:
            raise
        _print_error(f"{type(error).__name__}: {error} (run with --debug for the traceback)")
        sys.exit(1)
