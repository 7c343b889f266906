"""Bounded load test of `dataward serve` on loopback: throughput, p50/p99 latency, 429s, 5xx at 1x and 4x capacity.

Figures: BENCHMARKS.md, section "Service: process workers (issue 18)".
Figures: BENCHMARKS.md, section "Service with the ledger in PostgreSQL (issue 18)".

Starts the server itself (a subprocess on 127.0.0.1 and a free port, never any other address) on a tiny ward it trains
in a temporary folder (or on --ward), measures, stops the server and exits. Each phase is bounded by a request count and
a time limit.

    python benchmarks/service_load.py --configs processes:1:1,processes:2:2,threads:2:2 --requests 40 --seconds 60
    python benchmarks/service_load.py --configs processes:2:2 --ledger-url postgresql://dataward@127.0.0.1:5432/load

With ``--ledger-url`` (an empty PostgreSQL database) every config runs twice, one after the other: on the ward with its
SQLite ledger, then on a copy whose ledger was moved into that database (``dataward ledger move``), as replicas on
several machines run; the table gives the PostgreSQL / SQLite throughput of each config.

Each config is ``KIND:WORKERS:QUEUE`` (``dataward serve --worker-kind KIND --workers WORKERS --queue QUEUE``); all run
in one invocation, one server after the other, and the throughput of each is printed relative to the first config's.
Capacity = workers + queue (generations admitted at once). Clients are closed-loop: each sends its next request when the
previous one is answered (after 0.1 s when it was a 429, so refused clients keep the pressure on without spinning).
Goals (issue 7): zero 5xx, every request beyond capacity answered 429 (with Retry-After), p99 of admitted requests
within 3x the single-request latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

HOST = "127.0.0.1"  # loopback only


def build_ward(folder: Path) -> tuple[Path, str]:
    """A tiny trained K=2, R=2 ward and a key reaching both compartments."""
    import torch

    from dataward.config import TrainConfig
    from dataward.ward import Ward

    torch.set_num_threads(1)
    path = folder / "ward"
    ward = Ward.create(path, "digits:subset=60", compartments=2, slices=2, train=TrainConfig(steps=4, batch_size=16, threads=1),
                       router_train=TrainConfig(steps=2, batch_size=16, threads=1))
    ward.train()
    _, key = ward.ledger.create_key("load", ward.compartments())
    ward.close()
    return path, key


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(ward: Path, port: int, workers: int, queue: int, log: Path, *options: str) -> subprocess.Popen:
    """`dataward serve` in a subprocess (with more ``options``, e.g. ``--worker-kind``); returns once /healthz answers."""
    argv = ["dataward", "serve", str(ward), "--host", HOST, "--port", str(port), "--workers", str(workers), "--queue", str(queue),
            "--log-level", "warning", *options]
    code = f"import sys; from dataward.app.cli import main; sys.argv = {argv!r}; main()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: see {log}")
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("the server did not start within 180 s")


async def phase(base: str, key: str, body: dict, clients: int, max_requests: int, max_seconds: float) -> dict:
    """``clients`` closed-loop clients until ``max_requests`` were admitted (answered 200) or ``max_seconds`` passed."""
    results: list[tuple[int, float, str | None]] = []  # (status, seconds, Retry-After)
    admitted = 0
    deadline = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=clients + 4)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal admitted
        while admitted < max_requests and time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                r = await http.post("/v1/generate", json=body, headers={"X-API-Key": key})
                status, retry = r.status_code, r.headers.get("retry-after")
            except httpx.HTTPError as error:
                status, retry = -1, type(error).__name__  # a hang or a dropped connection
            results.append((status, time.perf_counter() - started, retry))
            if status == 200:
                admitted += 1
            elif status == 429:
                await asyncio.sleep(0.1)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=max_seconds + 60, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    ok = np.array([s for st, s, _ in results if st == 200])
    refused = [(s, r) for st, s, r in results if st == 429]
    return {
        "clients": clients, "requests": len(results), "ok": int(len(ok)), "429": len(refused),
        "5xx": sum(1 for st, _, _ in results if 500 <= st < 600), "other": sum(1 for st, _, _ in results if st not in (200, 429) and not 500 <= st < 600),
        "429_with_retry_after": sum(1 for _, r in refused if r and r.isdigit()),
        "wall_s": round(wall, 2), "throughput_rps": round(len(ok) / wall, 2),
        "p50_s": round(float(np.percentile(ok, 50)), 3) if len(ok) else None,
        "p99_s": round(float(np.percentile(ok, 99)), 3) if len(ok) else None,
        "max_s": round(float(ok.max()), 3) if len(ok) else None,
        "p50_429_ms": round(1000 * float(np.median([s for s, _ in refused])), 1) if refused else None,
    }


async def single(base: str, key: str, body: dict, count: int) -> dict:
    """Sequential requests (one at a time): the single-request latency."""
    times = []
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        for _ in range(count):
            started = time.perf_counter()
            r = await http.post("/v1/generate", json=body, headers={"X-API-Key": key})
            r.raise_for_status()
            times.append(time.perf_counter() - started)
    return {"requests": count, "p50_s": round(float(np.median(times)), 3), "mean_s": round(float(np.mean(times)), 3)}


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn's graceful shutdown), then SIGKILL after 60 s."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(ward: Path, key: str, kind: str, workers: int, queue: int, args: argparse.Namespace, log: Path) -> dict:
    """One server config: single-request latency, then closed-loop phases at 1x and 4x its capacity."""
    port = free_port()
    proc = start_server(ward, port, workers, queue, log, "--worker-kind", kind)
    try:
        base = f"http://{HOST}:{port}"
        body = {"n": args.n, "steps": args.steps, "seed": 0}
        asyncio.run(single(base, key, body, 2))  # warm-up: load the models in the workers
        capacity = workers + queue
        report = {
            "config": {"kind": kind, "workers": workers, "queue": queue, "capacity": capacity, "n": args.n, "steps": args.steps,
                       "cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)},
            "single": asyncio.run(single(base, key, body, args.single)),
        }
        for factor in (1, 4):
            report[f"{factor}x"] = asyncio.run(phase(base, key, body, factor * capacity, args.requests, args.seconds))
            r = report[f"{factor}x"]
            r["p99_over_single"] = round(r["p99_s"] / report["single"]["p50_s"], 2) if r["p99_s"] else None
        report["goals"] = {
            "zero_5xx": all(report[p]["5xx"] == 0 for p in ("1x", "4x")),
            "all_excess_429": all(report[p]["other"] == 0 and report[p]["5xx"] == 0 for p in ("1x", "4x")),
            "all_429_have_retry_after": all(report[p]["429"] == report[p]["429_with_retry_after"] for p in ("1x", "4x")),
            "p99_within_3x_single": all((report[p]["p99_over_single"] or 99) <= 3 for p in ("1x", "4x")),
        }
        return report
    finally:
        stop_server(proc)


def print_tables(reports: list[dict], ledgers: list[str]) -> None:
    """The rows of BENCHMARKS.md's tables: one per config and phase; with a PostgreSQL ledger, one per config and ledger."""
    first = reports[0]["1x"]["throughput_rps"]
    for i, r in enumerate(reports):
        same = reports[i - ledgers.index(r["config"]["ledger"])]  # the SQLite run just before it, same config
        r["throughput_over_first"] = round(r["1x"]["throughput_rps"] / first, 3)
        r["throughput_over_sqlite"] = round(r["1x"]["throughput_rps"] / same["1x"]["throughput_rps"], 3)
    print("\n| config | single (p50) | phase | clients | 200 | 429 (all with Retry-After) | 5xx / other | throughput | p99 | p99 / single |"
          "\n|---|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        c = r["config"]
        label = f"{c['kind']}, workers {c['workers']}, queue {c['queue']}" + (f", {c['ledger']}" if len(ledgers) > 1 else "")
        for phase in ("1x", "4x"):
            p = r[phase]
            refused = f"{p['429']}" + ("" if p["429"] == p["429_with_retry_after"] else f" ({p['429_with_retry_after']} with Retry-After)")
            head = f"| {label} | {r['single']['p50_s']} s" if phase == "1x" else "| |"
            print(f"{head} | {phase} | {p['clients']} | {p['ok']} | {refused} | {p['5xx']} / {p['other']} | {p['throughput_rps']} req/s "
                  f"| {p['p99_s']} s | {p['p99_over_single']}x |")
    print("\n1x throughput / the first config's: " + ", ".join(f"{r['throughput_over_first']}" for r in reports))
    if len(ledgers) > 1:
        print("\n| config (in run order) | ledger | single (p50) | 1x throughput | PostgreSQL / SQLite (1x) | p99 / single: 1x, 4x "
              "| 429 at 4x | 5xx / other |\n|---|---|---|---|---|---|---|---|")
        for r in reports:
            c = r["config"]
            label = f"{c['kind']}, workers {c['workers']}, queue {c['queue']}" if c["ledger"] == ledgers[0] else ""
            ratio = f"**{r['throughput_over_sqlite']}**" if c["ledger"] != ledgers[0] else ""
            print(f"| {label} | {c['ledger']} | {r['single']['p50_s']} s | {r['1x']['throughput_rps']} req/s | {ratio} "
                  f"| {r['1x']['p99_over_single']}, {r['4x']['p99_over_single']} | {r['4x']['429']} "
                  f"| {r['1x']['5xx'] + r['4x']['5xx']} / {r['1x']['other'] + r['4x']['other']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ward", type=Path, help="A trained ward (default: train a tiny one in a temporary folder).")
    parser.add_argument("--key", help="A key for --ward (default: one is created).")
    parser.add_argument("--configs", default="processes:1:1,processes:2:2,threads:2:2", help="KIND:WORKERS:QUEUE, comma-separated.")
    parser.add_argument("--n", type=int, default=4, help="Images per request.")
    parser.add_argument("--steps", type=int, default=20, help="Sampling steps per request.")
    parser.add_argument("--requests", type=int, default=40, help="Admitted requests per phase (bound).")
    parser.add_argument("--seconds", type=float, default=60.0, help="Time limit per phase (bound).")
    parser.add_argument("--single", type=int, default=8, help="Sequential requests for the single-request latency.")
    parser.add_argument("--ledger-url", help="An empty PostgreSQL database: also measure each config with the ledger there.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="dataward-load-"))
    try:
        if args.ward:
            ward, key = args.ward, args.key
            if key is None:
                from dataward.ward import Ward

                w = Ward.open(ward)
                _, key = w.ledger.create_key(f"load-{os.getpid()}", w.compartments())
                w.close()
        else:
            ward, key = build_ward(scratch)
        ledgers = {"sqlite": ward}
        if args.ledger_url:
            from dataward.store.move import move_ledger

            shutil.copytree(ward, scratch / "ward-postgres")
            move_ledger(scratch / "ward-postgres", args.ledger_url)
            ledgers["postgres"] = scratch / "ward-postgres"
        reports = []
        for config in args.configs.split(","):
            kind, workers, queue = config.split(":")
            for ledger, folder in ledgers.items():
                reports.append(measure(folder, key, kind, int(workers), int(queue), args, scratch / f"server-{len(reports)}.log"))
                reports[-1]["config"]["ledger"] = ledger
                print(json.dumps(reports[-1], indent=2), flush=True)
        print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print_tables(reports, list(ledgers))
        if args.json:
            args.json.write_text(json.dumps(reports, indent=2))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
