"""What several commands share: parsing compartment lists, opening a ward (finishing interrupted work first), the
progress of a command that trains (and what an interruption kept), and command groups on one ward (``dataward keys WARD ...``)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer

from dataward.app.terminal import console, progress_bar
from dataward.errors import DatawardError
from dataward.interrupts import Interrupted


def parse_ids(text: str | None) -> list[int] | None:
    """``"0,3"`` -> [0, 3]; None stays None."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DatawardError(f"expected comma-separated compartment numbers like 0,3, got {text!r}") from None


def open_ward(path: Path, resume: bool = True, device: str = "cpu"):
    """Open a ward; finish any interrupted forget or training first (the ledger remembers it)."""
    from dataward.ward import Ward

    ward = Ward.open(path)
    if resume and ward.ledger.pending_forgets():
        console.print("[yellow]finishing an interrupted forget request first[/yellow]")
        with training(ward) as progress:
            ward.train(device=device, progress=progress)
    return ward


@contextmanager
def training(ward, show: bool = True) -> Iterator[object | None]:
    """The progress display of a command that trains ``ward`` (none when ``show`` is false); a SIGINT or SIGTERM that
    stops it notes how many of the ward's stages are trained and kept, and which ward to train again to resume."""
    try:
        with progress_bar(show) as progress:
            yield progress
    except Interrupted as stop:
        lineages = ward.lineages()
        done = sum(len(ward.planner.ready_stages(lineage)) for lineage in lineages)
        stop.add_note(f"{done} of {sum(len(lineage.stage_ids) for lineage in lineages)} stage(s) of the ward are trained and kept")
        stop.ward = str(ward.path)
        raise


def ward_group(summary: str) -> typer.Typer:
    """A command group on one ward, ``dataward NAME WARD COMMAND``; its commands find the folder in ``ctx.obj["ward"]``."""
    group = typer.Typer(no_args_is_help=True, help=summary)

    @group.callback()
    def _ward(ctx: typer.Context, ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder.")) -> None:
        ctx.ensure_object(dict)["ward"] = ward

    return group


def check_writable(*paths: Path | None) -> None:
    """Refuse, before any work, an output file whose folder does not exist (never created behind the user's back)."""
    for path in filter(None, paths):
        if not Path(path).parent.is_dir():
            raise DatawardError(f"cannot write {path}: the folder {Path(path).parent} does not exist (create it first, or choose another path)")
