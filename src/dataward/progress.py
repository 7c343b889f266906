"""Progress reporting of long library calls (training, sampling) to an optional rich ``Progress`` display."""

from __future__ import annotations

from typing import Callable


def progress_task(progress, description: str, total: int) -> Callable[..., None]:
    """An update function ``update(advance=1, **fields)`` for a new task of ``progress`` (a no-op without one)."""
    if progress is None:
        return lambda *a, **k: None
    task = progress.add_task(description, total=total)
    return lambda advance=1, **fields: progress.update(task, advance=advance, **fields)
