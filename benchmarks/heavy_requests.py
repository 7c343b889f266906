"""Requests within the limits but heavy (issue 19, defect 5): are they served or refused at once, and does a generation
that runs past the timeout stop?

Figures: BENCHMARKS.md, section "Reliability".

Starts `dataward serve` itself (loopback, a free port) on a tiny ward it trains in a temporary folder, as
benchmarks/service_load.py does.

    python benchmarks/heavy_requests.py

Phase 1 (the issue's probe): `--workers 2 --queue 2`, four concurrent `{"n": 64, "steps": 250}` requests: their statuses
and latencies (before the fix: 1 x 200 and 3 x 503 after the 120 s timeout on a loaded machine, because the timeout
counted the queue wait).
Phase 2 (abandoned work): `--workers 1 --queue 1 --timeout T` with T about a quarter of one heavy request's run: a heavy
request (503, stopped), then at once a small one; its latency / the small request's latency on the idle server, in the
same run (goal ~1: the stopped generation no longer holds the only worker; before the fix it ran to its end).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
from service_load import HOST, build_ward, free_port, start_server, stop_server

HEAVY = {"n": 64, "steps": 250, "seed": 0}
SMALL = {"n": 1, "steps": 10, "seed": 0}


async def concurrent(base: str, key: str, body: dict, count: int) -> list[tuple[int, float]]:
    """``count`` requests at once: (status, seconds) each."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        async def one() -> tuple[int, float]:
            started = time.perf_counter()
            r = await http.post("/v1/generate", json=body, headers={"X-API-Key": key})
            return r.status_code, round(time.perf_counter() - started, 2)

        return list(await asyncio.gather(*(one() for _ in range(count))))


def timed(base: str, key: str, body: dict) -> tuple[int, float]:
    started = time.perf_counter()
    r = httpx.post(f"{base}/v1/generate", json=body, headers={"X-API-Key": key}, timeout=600)
    return r.status_code, round(time.perf_counter() - started, 3)


def serve(ward: Path, scratch: Path, workers: int, queue: int, *options: str):
    port = free_port()
    return start_server(ward, port, workers, queue, scratch / f"server-{port}.log", *options), f"http://{HOST}:{port}"


def main() -> None:
    scratch = Path(tempfile.mkdtemp(prefix="dataward-heavy-"))
    report: dict = {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    try:
        ward, key = build_ward(scratch)
        proc, base = serve(ward, scratch, 2, 2)
        try:
            timed(base, key, SMALL)  # warm-up
            report["heavy_alone"] = timed(base, key, HEAVY)
            report["phase1_four_heavy_workers2_queue2"] = asyncio.run(concurrent(base, key, HEAVY, 4))
        finally:
            stop_server(proc)
        timeout = max(1.0, report["heavy_alone"][1] / 4)
        proc, base = serve(ward, scratch, 1, 1, "--timeout", f"{timeout:.1f}")
        try:
            timed(base, key, SMALL)  # warm-up
            idle = [timed(base, key, SMALL)[1] for _ in range(3)]
            heavy = timed(base, key, HEAVY)
            after = timed(base, key, SMALL)
            report["phase2"] = {"timeout_s": round(timeout, 1), "heavy": heavy, "small_right_after": after,
                                "small_idle_median_s": sorted(idle)[1],
                                "after_over_idle": round(after[1] / sorted(idle)[1], 2)}
        finally:
            stop_server(proc)
        statuses = [s for s, _ in report["phase1_four_heavy_workers2_queue2"]]
        report["goals"] = {"phase1_no_5xx": all(s < 500 for s in statuses), "phase2_heavy_stopped_503": report["phase2"]["heavy"][0] == 503}
        print(json.dumps(report, indent=2))
        phase2 = report["phase2"]
        print("\n| figure | value | goal | command | commit |\n|---|---|---|---|---|")
        print(f"| a small request after a heavy one stopped at the timeout / on the idle server | **{phase2['after_over_idle']}x** "
              f"({phase2['small_right_after'][1]} s vs {phase2['small_idle_median_s']} s) | the same | `python benchmarks/heavy_requests.py` | |")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
