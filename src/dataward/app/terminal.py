"""Terminal output of the command line and the demo: the two consoles, the progress bar, and how (ε, δ) are written.

``console`` writes messages and progress to stderr; ``out`` writes results to stdout (so ``--json`` output stays clean).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console

from dataward.progress import progress_display

console = Console(stderr=True)
out = Console()


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[object | None]:
    """The CLI's progress display on stderr (:func:`dataward.progress.progress_display`): a rich progress bar, or plain
    lines when stderr is not a terminal; none when ``enabled`` is false, e.g. for --json."""
    with progress_display(enabled, console) as progress:
        yield progress


def print_path(console: Console, path: object, prefix: str = "") -> None:
    """``prefix`` and a path on one line, never wrapped, folded or cut at the terminal's width (it stays whole, to copy);
    neither is read as rich markup."""
    console.print(f"{prefix}{path}", soft_wrap=True, markup=False, highlight=False)


def epsilon_delta(epsilon: float | str, delta: float) -> str:
    """(ε, δ) written one way everywhere: ε to 3 decimals (or "inf"), δ in scientific notation with 2 decimals."""
    eps = epsilon if isinstance(epsilon, str) else ("inf" if epsilon == float("inf") else f"{epsilon:.3f}")
    return f"ε = {eps}, δ = {delta:.2e}"
