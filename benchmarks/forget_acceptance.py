"""Time from `POST /v1/forget` to its 202, with and without a retraining in flight (issue 19; goal: the same).

Figures: BENCHMARKS.md, section "Reliability".

Starts `dataward serve` itself (loopback, a free port, as benchmarks/service_load.py does) on a K=2, R=2 ward it trains
in a temporary folder with a budget that makes one retraining take several seconds. Each round: a forget on the idle
server (no retraining running), then, one second later while the retraining it started runs, a second forget; both
timed from the request to the 202 (the two forgets are in different compartments, so each quarantines models of its own).
Then it waits for both to be done.

    python benchmarks/forget_acceptance.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from service_load import HOST, free_port, start_server, stop_server


def build_ward(folder: Path, steps: int) -> tuple[Path, str, list[list[str]]]:
    """A trained K=2, R=2 ward, an admin key, and per compartment the sample IDs of slice 0 (a forget retrains both stages)."""
    import torch

    from dataward.config import TrainConfig
    from dataward.ward import Ward

    torch.set_num_threads(1)
    path = folder / "ward"
    ward = Ward.create(path, "digits:subset=200", compartments=2, slices=2, base=None,
                       train=TrainConfig(steps=steps, batch_size=16, threads=1), router_train=TrainConfig(steps=2, batch_size=16, threads=1))
    ward.train()
    _, key = ward.ledger.create_key("ops", ward.compartments(), admin=True)
    ids = [[r[0] for r in ward.ledger.samples(c) if r[3] == 0] for c in ward.compartments()]
    ward.close()
    return path, key, ids


def forget(http: httpx.Client, key: str, sample_id: str) -> tuple[float, str]:
    started = time.perf_counter()
    r = http.post("/v1/forget", json={"ids": [sample_id]}, headers={"X-API-Key": key})
    seconds = time.perf_counter() - started
    assert r.status_code == 202, r.text
    return seconds, r.json()["request"]


def wait_done(http: httpx.Client, key: str, request: str) -> None:
    while http.get(f"/v1/forget/{request}", headers={"X-API-Key": key}).json()["state"] != "done":
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150, help="Training steps per stage (sets how long a retraining runs).")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dataward-forget-"))
    proc = None
    try:
        ward, key, ids = build_ward(scratch, args.steps)
        port = free_port()
        proc = start_server(ward, port, 1, 1, scratch / "server.log")
        idle, busy, retrain = [], [], []
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=600) as http:
            for k in range(args.rounds):
                a, b = (0, 1) if k % 2 == 0 else (1, 0)  # the second forget quarantines the other compartment's models
                first_seconds, first = forget(http, key, ids[a][k])
                time.sleep(1.0)
                running = http.get(f"/v1/forget/{first}", headers={"X-API-Key": key}).json()["retraining"]
                second_seconds, second = forget(http, key, ids[b][k])
                started = time.perf_counter()
                wait_done(http, key, first)
                wait_done(http, key, second)
                retrain.append(time.perf_counter() - started)
                idle.append(first_seconds)
                if running:
                    busy.append(second_seconds)
        report = {
            "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "rounds": args.rounds,
            "idle_202_ms": [round(1000 * s, 1) for s in idle], "during_retraining_202_ms": [round(1000 * s, 1) for s in busy],
            "retraining_s_after_second_forget": [round(s, 1) for s in retrain],
            "median_idle_ms": round(1000 * statistics.median(idle), 1),
            "median_during_retraining_ms": round(1000 * statistics.median(busy), 1) if busy else None,
        }
        if busy:
            report["during_over_idle"] = round(statistics.median(busy) / statistics.median(idle), 2)
        print(json.dumps(report, indent=2))
        if busy:
            print("\n| figure | value | goal | command | commit |\n|---|---|---|---|---|")
            print(f"| `POST /v1/forget` to its 202, retraining in flight / idle (median of {args.rounds}) | **{report['during_over_idle']}x** "
                  f"({report['median_during_retraining_ms']} ms, {min(busy) * 1000:.1f}-{max(busy) * 1000:.1f}, vs {report['median_idle_ms']} ms, "
                  f"{min(idle) * 1000:.1f}-{max(idle) * 1000:.1f}) | the same | `python benchmarks/forget_acceptance.py --rounds {args.rounds}` | |")
    finally:
        if proc is not None:
            stop_server(proc)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
