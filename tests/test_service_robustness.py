"""The service under careless and hostile clients (issue 35): a client that goes away stops its generation, worker
processes die with their server, and bad input gets short, clear 4xx answers that leak nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port, live_server
from dataward.app.service import create_app
from dataward.app.service.workers import RunClock

STEPS = 2


def wait_until(condition, timeout: float = 60.0) -> bool:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_client_that_disconnects_stops_its_generation(service_ward, monkeypatch):
    """Issue 35 item 10: a client that timed out (and closed its connection) left its generation running to the end."""
    path, keys = service_ward
    steps_run, running, flag_seen = [], threading.Event(), []
    original = RunClock.update

    def update(clock, *args, **kwargs):
        steps_run.append(1)
        if len(steps_run) == 3:  # mid-generation: wait (bounded) for the server to notice that the client went away
            running.set()
            flag_seen.append(wait_until(lambda: clock.stopped, timeout=20))
        return original(clock, *args, **kwargs)

    monkeypatch.setattr(RunClock, "update", update)
    app = create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads")
    with live_server(app) as (base, _, _):
        service = app.state.service
        client_error = []

        def impatient_client():
            try:
                httpx.post(f"{base}/v1/generate", headers={"X-API-Key": keys["c0"]}, json={"n": 1, "steps": 200}, timeout=2)
            except httpx.TimeoutException as error:
                client_error.append(error)

        thread = threading.Thread(target=impatient_client, daemon=True)
        thread.start()
        assert running.wait(60)
        thread.join(60)
        assert client_error, "the client should have timed out"
        assert wait_until(lambda: service.admitted == 0)  # the run ended and gave its slot back
        assert flag_seen == [True]  # the disconnect set the generation's stop flag
        assert len(steps_run) <= 4  # stopped at its next step, not after 200
        with httpx.Client(base_url=base, timeout=60) as http:  # the worker is free for the next client
            r = http.post("/v1/generate", headers={"X-API-Key": keys["c0"]}, json={"n": 1, "steps": STEPS})
            assert r.status_code == 200, r.text


def children_of(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is ``pid``, from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (zombies count as ended)."""
    running = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.add(pid)
        except OSError:
            pass
    return running


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc to find a server's children")
def test_worker_processes_die_with_a_killed_server(service_ward):
    """Issue 35 item 12: after kill -9 of `dataward serve`, its worker processes and the resource tracker lived on
    (~1 GB per crash)."""
    path, _ = service_ward
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", "from dataward.app.cli import main; main()", "serve", str(path), "--port",
                               str(port), "--workers", "1", "--queue", "1", "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return server.poll() is not None  # stop waiting if it died
        assert wait_until(ready, timeout=240) and server.poll() is None
        children = children_of(server.pid)
        assert len(children) >= 2, children  # the generation worker and multiprocessing's resource tracker
        server.kill()
        server.wait(30)
        assert wait_until(lambda: not alive(children), timeout=30), f"still running after the server was killed: {alive(children)}"
    finally:
        if server.poll() is None:
            server.kill()
        for pid in alive(children):  # only on failure: leave nothing behind
            os.kill(pid, signal.SIGKILL)


def test_bad_input_gets_a_short_clear_4xx(service_ward):
    """Issue 35 item 14: a label past int64 was a 500; unknown field names and IDs were echoed whole (~10 KB)."""
    from fastapi.testclient import TestClient

    path, keys = service_ward
    with TestClient(create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads")) as c:
        h = {"X-API-Key": keys["c0"]}
        r = c.post("/v1/generate", headers=h, json={"n": 1, "steps": STEPS, "label": 9223372036854775808})
        assert r.status_code == 422 and "label" in r.json()["detail"], r.text
        r = c.post("/v1/generate", headers=h, json={"n": 1, "x" * 10_000: 1})
        assert r.status_code == 422 and "unknown field" in r.json()["detail"] and len(r.content) < 1000, len(r.content)
        admin = {"X-API-Key": keys["admin"]}
        r = c.post("/v1/forget", headers=admin, json={"ids": [f"{k}" + "y" * 500 for k in range(10)]})
        assert r.status_code == 404 and len(r.content) < 2000, len(r.content)
        r = c.get("/v1/forget/" + "z" * 5000, headers=admin)
        assert r.status_code == 404 and len(r.content) < 1000, len(r.content)


def test_ward_paths_are_printed_as_they_are_not_as_markup(service_ward, tmp_path):
    """Issue 35 item 14: `dataward serve 'x[/b]'` crashed with rich's MarkupError; a ward `R[red]w` printed as "Rw"."""
    import shutil

    path, _ = service_ward
    ward = tmp_path / "R[red]w" / "x[" / "b]"
    shutil.copytree(path, ward)
    with socket.socket() as busy:  # uvicorn cannot bind: serve prints its line, then exits
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.run([sys.executable, "-c", "from dataward.app.cli import main; main()", "serve", str(ward), "--port",
                               str(busy.getsockname()[1]), "--worker-kind", "threads", "--workers", "1"],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, COLUMNS="400"))
    assert "MarkupError" not in proc.stderr
    assert f"serving {ward} on" in proc.stderr, proc.stderr[-2000:]
