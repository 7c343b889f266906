"""Progress of long library calls (training, sampling): the display the CLI shows, which the Python API shows too by
default (``progress=True``, as diffusers pipelines show theirs), and the update functions the work reports to.

On a terminal the display is a rich ``Progress`` bar on stderr; when stderr is a file or a pipe it is
:class:`LineProgress` (plain lines). ``progress=False`` (or None) shows nothing; any object with rich's ``add_task`` and
``update`` can be passed instead.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Union

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

ProgressOption = Union[bool, None, object]  # True: show the default display; False/None: none; else a display to use


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
def progress_display(progress: ProgressOption = True, console: Console | None = None) -> Iterator[object | None]:
    """The display to report to while the block runs: for ``progress=True`` a rich progress bar on ``console`` (default:
    stderr), or :class:`LineProgress` when it is not a terminal; None for False or None; ``progress`` itself otherwise."""
    if progress is None or progress is False:
        yield None
        return
    if progress is not True:
        yield progress
        return
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield LineProgress(console)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as bar:
        yield bar


def progress_task(progress, description: str, total: int) -> Callable[..., None]:
    """An update function ``update(advance=1, **fields)`` for a new task of ``progress`` (a no-op without one)."""
    if progress is None:
        return lambda *a, **k: None
    task = progress.add_task(description, total=total)
    return lambda advance=1, **fields: progress.update(task, advance=advance, **fields)
