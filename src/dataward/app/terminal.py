"""Terminal output of the command line and the demo: the two consoles, the progress bar, and how (ε, δ) are written.

``console`` writes messages and progress to stderr; ``out`` writes results to stdout (so ``--json`` output stays clean).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
out = Console()


class LineProgress:
    """Progress as plain lines, for a stderr that is a file or a pipe (a CI log, ``2> train.log``), where a live bar would
    only appear when the work ends: a line when a task starts, at every tenth of it, and when it ends, each with the
    elapsed time. The ``add_task``/``update`` part of rich's ``Progress`` that dataward uses."""

    def __init__(self, console: Console):
        self.console = console
        self.tasks: dict[int, dict] = {}

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "done": 0.0, "shown": -1, "started": time.monotonic()}
        self.console.print(f"{description}: started" + (f" (0/{total:g})" if total else ""), highlight=False, markup=False)
        return task

    def update(self, task: int, advance: float = 0, description: str | None = None, **fields) -> None:
        state = self.tasks[task]
        state["done"] += advance
        if description is not None:
            state["description"] = description
        total = state["total"]
        if not total:
            return
        tenth = int(10 * min(state["done"], total) / total)
        if tenth > state["shown"] and tenth > 0:
            state["shown"] = tenth
            self.console.print(f"{state['description']}: {state['done']:g}/{total:g} ({10 * tenth}%), "
                               f"{time.monotonic() - state['started']:.1f} s", highlight=False, markup=False)


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | LineProgress | None]:
    """A rich progress display on stderr, or :class:`LineProgress` when stderr is not a terminal (none when ``enabled``
    is false, e.g. for --json)."""
    if not enabled:
        yield None
        return
    if not console.is_terminal:
        yield LineProgress(console)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        yield progress


def print_path(console: Console, path: object, prefix: str = "") -> None:
    """``prefix`` and a path on one line, never wrapped, folded or cut at the terminal's width (it stays whole, to copy);
    neither is read as rich markup."""
    console.print(f"{prefix}{path}", soft_wrap=True, markup=False, highlight=False)


def epsilon_delta(epsilon: float | str, delta: float) -> str:
    """(ε, δ) written one way everywhere: ε to 3 decimals (or "inf"), δ in scientific notation with 2 decimals."""
    eps = epsilon if isinstance(epsilon, str) else ("inf" if epsilon == float("inf") else f"{epsilon:.3f}")
    return f"ε = {eps}, δ = {delta:.2e}"
