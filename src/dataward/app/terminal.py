"""Terminal output of the command line and the demo: the two consoles, the progress bar, and how (ε, δ) are written.

``console`` writes messages and progress to stderr; ``out`` writes results to stdout (so ``--json`` output stays clean).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
out = Console()


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | None]:
    """A rich progress display on stderr (none when ``enabled`` is false, e.g. for --json)."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        yield progress


def epsilon_delta(epsilon: float | str, delta: float) -> str:
    """(ε, δ) written one way everywhere: ε to 3 decimals (or "inf"), δ in scientific notation with 2 decimals."""
    eps = epsilon if isinstance(epsilon, str) else ("inf" if epsilon == float("inf") else f"{epsilon:.3f}")
    return f"ε = {eps}, δ = {delta:.2e}"
