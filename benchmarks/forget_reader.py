"""Forget acceptance with and without an outside reader holding a snapshot (issue 35 item 1).

Figures: BENCHMARKS.md, section "Reliability: the second probe (issue 35)".

    python benchmarks/forget_reader.py [--forgets 10] [--workdir DIR]

A tiny trained ward (digits:subset=200, K=2, R=2). Each case forgets ``--forgets`` IDs one request at a time through
``Ward.accept_forget`` (what `dataward forget` and `POST /v1/forget` run before they answer) and times each call: once
with no other connection, once while another connection holds a read transaction on ledger.sqlite (``BEGIN; SELECT
count(*) FROM samples;``, as a backup tool or an analyst's sqlite3 shell does). Then it releases the reader and times
how long physical erasure takes to follow. Prints one table row per case.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from dataward.config import TrainConfig
from dataward.ward import Ward


def accept_times(ward: Ward, ids: list[str]) -> tuple[list[float], int]:
    """Seconds of each accept_forget, and how many answered with their erasure still to come."""
    times, unerased = [], 0
    for sample_id in ids:
        t0 = time.perf_counter()
        result = ward.accept_forget([sample_id])
        times.append(time.perf_counter() - t0)
        unerased += not result.erased
    return times, unerased


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forgets", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dw-accept-"))
    base = root / "base"
    if not base.exists():
        ward = Ward.create(base, "digits:subset=200", compartments=2, slices=2, train=TrainConfig(steps=30, batch_size=16),
                           router_train=TrainConfig(steps=10, batch_size=16))
        ward.train()
        ward.close()
    print("| case | forgets | median accept (s) | max accept (s) | answered before erasure | erasure after the reader let go (s) |")
    print("|---|---|---|---|---|---|")
    for reader_held in (False, True):
        path = root / f"case-{int(reader_held)}"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(base, path)
        ward = Ward.open(path)
        ids = list(ward.training_data().ids)[: args.forgets]
        reader = None
        if reader_held:
            reader = sqlite3.connect(path / "ledger.sqlite", isolation_level=None)
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM samples").fetchone()
        times, unerased = accept_times(ward, ids)
        follow = "-"
        if reader is not None:
            reader.execute("COMMIT")
            reader.close()
            t0 = time.perf_counter()
            ward.eraser.wait(120)
            follow = f"{time.perf_counter() - t0:.3f}"
        print(f"| {'reader holds a snapshot' if reader_held else 'no other connection'} | {len(ids)} | {statistics.median(times):.4f} | "
              f"{max(times):.4f} | {unerased} | {follow} |", flush=True)
        ward.close()


if __name__ == "__main__":
    main()
