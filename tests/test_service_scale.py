"""Scaling the service: process workers (each with its own models) and replicas (servers over one ward folder).

The tests in test_service.py run the service's semantics with thread workers (they patch ``Ward.sample`` in-process);
these run the default, process workers, and check what crossing processes could break: bytes, the forget check under
concurrent load, the stop flag, a killed worker; then two `dataward serve` replicas, a forget through one of them.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from dataward.app.service import ServiceLimits, create_app
from dataward.store.move import move_ledger
from dataward.ward import Ward
from conftest import free_port
from test_service import STEPS, assert_clean_error, auth, forgotten_seen, id_in, wait_done


def processes_app(path, **options):
    return TestClient(create_app(path, pool_size=2, queue_size=2, torch_threads=1, worker_kind="processes", **options))


def worker_pids(c: TestClient) -> list[int]:
    return list(c.app.state.service.generations._executor._processes)


def test_process_workers_give_the_librarys_bytes_in_processes_of_their_own(service_ward):
    path, keys = service_ward
    with processes_app(path) as c:
        pids = worker_pids(c)
        assert len(pids) == 2 and os.getpid() not in pids  # started, and ready, before the first request
        r = c.post("/v1/generate", headers=auth(keys["c0"]), json={"n": 3, "steps": STEPS, "seed": 11, "format": "npz"})
        assert r.status_code == 200, r.text
        served = np.load(io.BytesIO(base64.b64decode(r.json()["npz"])), allow_pickle=False)["images"]
    torch.set_num_threads(1)  # the app's torch_threads
    ward = Ward.open(path, worker=True)
    alone = ward.sample(3, seed=11, steps=STEPS, allowed=[0]).images.numpy()
    ward.close()
    assert np.array_equal(served, alone)


def test_no_response_after_a_forgets_202_comes_from_a_model_that_saw_the_id(service_ward, tmp_path):
    """Issue 18's count: generations run on two worker processes without pause while an ID is forgotten; every request
    sent after the forget's 202 must be answered by models that never saw it (0 allowed)."""
    path, keys = service_ward
    shutil.copytree(path, tmp_path / "ward")
    path = tmp_path / "ward"
    target = id_in(path, 0, 0)
    responses: list[tuple[float, dict]] = []  # (when the request was sent, the models that served it)
    stop = threading.Event()

    def generate_until_stopped(c):
        while not stop.is_set():
            sent = time.monotonic()
            r = c.post("/v1/generate", headers=auth(keys["c0"]), json={"n": 2, "steps": STEPS})
            if r.status_code == 200:
                responses.append((sent, r.json()["models"]))

    with processes_app(path) as c:
        clients = [threading.Thread(target=generate_until_stopped, args=(c,), daemon=True) for _ in range(3)]
        for thread in clients:
            thread.start()
        time.sleep(1.0)
        accepted = c.post("/v1/forget", headers=auth(keys["admin"]), json={"ids": [target]})
        acknowledged = time.monotonic()
        assert accepted.status_code == 202, accepted.text
        wait_done(c, accepted.json()["request"], auth(keys["admin"]))
        time.sleep(1.0)
        stop.set()
        for thread in clients:
            thread.join(60)
    after = [models for at, models in responses if at > acknowledged]
    before = [models for at, models in responses if at <= acknowledged]
    assert before and len(after) >= 3, (len(before), len(after))
    served_after = {models["0"]["model"] for models in after}
    assert forgotten_seen(path, served_after) == set()  # the figure: 0 responses from a model that saw the ID
    assert forgotten_seen(path, {models["0"]["model"] for models in before})  # the test can fail: the old model did see it


def test_a_stop_reaches_a_worker_process(service_ward):
    path, keys = service_ward
    with processes_app(path, limits=ServiceLimits(generate_timeout_s=0.05)) as c:
        started = time.monotonic()
        r = c.post("/v1/generate", headers=auth(keys["c0"]), json={"n": 64, "steps": 250})
        assert_clean_error(r, 503, "stopped", "fewer images or steps")
        assert time.monotonic() - started < 20  # 250 steps of 64 images take far longer: the worker stopped
        assert c.app.state.service.admitted == 0


def test_a_killed_worker_process_is_replaced_and_the_service_keeps_serving(service_ward):
    path, keys = service_ward
    body = {"n": 1, "steps": STEPS}
    with processes_app(path) as c:
        for pid in worker_pids(c):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        first = c.post("/v1/generate", headers=auth(keys["c0"]), json=body)
        assert first.status_code in (200, 503), first.text
        if first.status_code == 503:
            assert_clean_error(first, 503, "worker stopped", "retry")
            assert first.headers["retry-after"] == "5"
        after = [c.post("/v1/generate", headers=auth(keys["c1"]), json=body) for _ in range(2)]
        assert [r.status_code for r in after] == [200, 200], [r.text for r in after]
        assert c.app.state.service.admitted == 0


def test_an_unknown_worker_kind_is_refused(service_ward):
    from dataward.errors import DatawardError

    with pytest.raises(DatawardError, match="worker_kind processes or threads; got 2, 8 and 'fibres'"):
        create_app(service_ward[0], worker_kind="fibres")


def serve_replica(path, port: int, log, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """`dataward serve` on ``host``:``port`` (one thread worker: light), started behind the command ``prefix`` (e.g. ``ip
    netns exec HOST``), returned once /healthz answers."""
    argv = ["dataward", "serve", str(path), "--host", host, "--port", str(port), "--workers", "1", "--worker-kind", "threads",
            "--log-level", "warning"]
    code = f"import sys; from dataward.app.cli import main; sys.argv = {argv!r}; main()"
    proc = subprocess.Popen([*prefix, sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://{host}:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"replica on {host}:{port} did not start")


def forget_through_a_while_b_serves(path, keys, a: str, b: str) -> None:
    """Clients keep generating through replica ``b`` while a forget goes through replica ``a``; asserts that every request
    sent to ``b`` after ``a``'s 202 was answered by models that never saw the ID (and that ``b`` served the old model
    before it: the check can fail)."""
    target = id_in(path, 0, 0)
    responses: list[tuple[float, int, dict | None]] = []
    stop = threading.Event()

    def generate_on_b():
        with httpx.Client(base_url=b, timeout=120) as http:
            while not stop.is_set():
                sent = time.monotonic()
                r = http.post("/v1/generate", headers=auth(keys["c0"]), json={"n": 1, "steps": STEPS})
                responses.append((sent, r.status_code, r.json().get("models") if r.status_code == 200 else None))

    clients = [threading.Thread(target=generate_on_b, daemon=True) for _ in range(2)]
    for thread in clients:
        thread.start()
    time.sleep(1.0)
    accepted = httpx.post(f"{a}/v1/forget", headers=auth(keys["admin"]), json={"ids": [target]}, timeout=60)
    acknowledged = time.monotonic()
    assert accepted.status_code == 202, accepted.text
    request = accepted.json()["request"]
    deadline = time.time() + 120
    while httpx.get(f"{b}/v1/forget/{request}", headers=auth(keys["admin"])).json()["state"] != "done":  # B sees A's forget
        assert time.time() < deadline, "retraining did not finish"
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for thread in clients:
        thread.join(120)
    after = [(status, models) for sent, status, models in responses if sent > acknowledged]
    assert len(after) >= 3 and all(status in (200, 503) for status, _ in after), after
    served_after = {models["0"]["model"] for status, models in after if status == 200}
    assert served_after and forgotten_seen(path, served_after) == set()  # 0 requests answered by a model that saw the ID
    before = {models["0"]["model"] for sent, status, models in responses if sent <= acknowledged and status == 200}
    assert forgotten_seen(path, before)  # the test can fail: B served the old model until the forget


@pytest.mark.parametrize("ledger", ["sqlite", "postgres"])
def test_a_forget_through_one_replica_holds_at_once_on_the_other(service_ward, tmp_path, ledger, request):
    """Two server processes over one ward folder (docs/scale-out.md), its ledger in SQLite or in PostgreSQL (as replicas
    on several machines have it)."""
    path, keys = service_ward
    shutil.copytree(path, tmp_path / "ward")
    path = tmp_path / "ward"
    if ledger == "postgres":
        move_ledger(path, request.getfixturevalue("postgres")())
    ports = [free_port(), free_port()]
    with open(tmp_path / "replicas.log", "w") as log:
        replicas = [serve_replica(path, port, log) for port in ports]
        try:
            forget_through_a_while_b_serves(path, keys, *(f"http://127.0.0.1:{port}" for port in ports))
        finally:
            for proc in replicas:
                proc.terminate()
                proc.wait(60)
