"""The loss log of a stage (``train --report-to csv``, the default): one CSV row per optimizer step, written while the
stage trains and moved into its checkpoint folder as ``loss.csv`` when the stage's checkpoint is written.

Columns: ``stage_step`` (1.. within the stage), ``step`` (the model's global step), ``loss`` (the batch's mean loss),
``lr`` (Adam's learning rate). A stage resumed from an in-stage checkpoint keeps the rows up to that checkpoint's step,
so the log reads as one uninterrupted run. DP fine-tuning logs the same columns (its ε is in the model's metadata:
computing it at every step would cost more than the step). TensorBoard is not supported (not a dependency).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

from dataward.errors import DatawardError

LOSS_FILE = "loss.csv"
COLUMNS = ("stage_step", "step", "loss", "lr")
ReportTo = Literal["csv", "none"]
REPORT_TO: tuple[str, ...] = ("csv", "none")


def check_report_to(report_to: str) -> None:
    """Refuse an unknown ``report_to`` (TensorBoard is not supported: it is not a dependency of dataward)."""
    if report_to not in REPORT_TO:
        raise DatawardError(f"unknown report_to {report_to!r}: expected one of {', '.join(REPORT_TO)} (TensorBoard is not supported)")


class LossLog:
    """A stage's CSV loss log at ``path`` (nothing is written when ``path`` is None: ``--report-to none``)."""

    def __init__(self, path: Path | None, keep_steps: int = 0):
        """Open the log, keeping the rows of the first ``keep_steps`` stage steps of an earlier run of this stage."""
        self.path = path
        self.file = None
        if path is None:
            return
        rows = []
        if keep_steps and path.is_file():
            with path.open(newline="") as old:
                rows = [row for row in csv.reader(old)][1:]
            rows = [row for row in rows if len(row) == len(COLUMNS) and row[0].isdigit() and int(row[0]) <= keep_steps]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerows([COLUMNS, *rows])

    def write(self, stage_step: int, step: int, loss: float, lr: float) -> None:
        """One row, flushed (a log one can follow while the stage trains: ``tail -f``)."""
        if self.file is not None:
            self.writer.writerow((stage_step, step, f"{loss:.6g}", f"{lr:.6g}"))
            self.file.flush()

    def close(self) -> None:
        """Close the file (it stays where it is until the stage's checkpoint folder takes it)."""
        if self.file is not None:
            self.file.close()
            self.file = None
