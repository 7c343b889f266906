"""The service under careless and hostile clients (issue 35): a client that goes away stops its generation, worker
processes die with their server, and bad input gets short, clear 4xx answers that leak nothing."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import pytest

from dataward.app.service import create_app
from dataward.app.service.workers import RunClock

STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app):
    """``app`` served by a real uvicorn on 127.0.0.1 (in a thread); yields (base URL, the app's service)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        assert server.started
        yield f"http://127.0.0.1:{port}", app.state.service
    finally:
        server.should_exit = True
        thread.join(60)


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
    with live_server(app) as (base, service):
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
