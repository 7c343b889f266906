"""The HTTP service: auth, grants, forgetting (also while generating), limits, overload, a real uvicorn.

One tiny ward is trained once per session; tests that change it work on a copy.
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import live_server
from dataward.app.service import ServiceLimits, StaleTraining, create_app, open_retraining_ward
from dataward.app.service.core import Service
from dataward.ward import Ward

STEPS = 2  # sampling steps in tests: quality is irrelevant, exactness is what is tested


@pytest.fixture
def ward_copy(service_ward, tmp_path):
    """A private copy of the session ward (for tests that forget or revoke)."""
    path, keys = service_ward
    copy = tmp_path / "ward"
    shutil.copytree(path, copy)
    return copy, keys


@pytest.fixture(scope="module")
def client(service_ward):
    """A client on the (read-only) session ward."""
    path, keys = service_ward
    with TestClient(create_app(path, pool_size=1, queue_size=4, torch_threads=1, worker_kind="threads")) as c:
        yield c, keys


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_clean_error(response: httpx.Response, status: int, *words: str) -> None:
    """A 4xx/5xx with a JSON message containing ``words`` and no traceback."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert "Traceback" not in response.text and "File \"" not in response.text
    for word in words:
        assert word in detail, detail


def forgotten_seen(ward_path, model_ids) -> set[int]:
    """Which of ``model_ids`` were trained on a now-forgotten ID."""
    ward = Ward.open(ward_path, worker=True)
    try:
        forgotten = set(ward.ledger.forgotten_ids())
        return {m for m in model_ids
                if forgotten & {r[0] for r in ward.ledger.db.execute("SELECT sample_id FROM model_samples WHERE model_id=?", (m,))}}
    finally:
        ward.close()


def id_in(ward_path, compartment: int, slice_: int) -> str:
    ward = Ward.open(ward_path, worker=True)
    try:
        return next(r[0] for r in ward.ledger.samples(compartment) if r[3] == slice_)
    finally:
        ward.close()


# auth ----------------------------------------------------------------------------------------------------------------
ENDPOINTS = [("get", "/readyz", None), ("get", "/v1/compartments", None), ("post", "/v1/generate", {"n": 1, "steps": STEPS}),
             ("post", "/v1/forget", {"ids": ["digits:0000"]}), ("get", "/v1/forget/abc", None)]


@pytest.mark.parametrize("method,url,body", ENDPOINTS)
def test_every_endpoint_needs_a_valid_unrevoked_key(client, method, url, body):
    c, keys = client
    for headers, words in (({}, ["missing API key"]), (auth("dw_not-a-key"), ["invalid API key"]), ({"X-API-Key": "nope"}, ["invalid"]),
                           (auth(keys["revoked"]), ["revoked"]), ({"Authorization": f"Basic {keys['admin']}"}, ["missing"])):
        r = c.request(method, url, headers=headers, json=body)
        assert_clean_error(r, 401, *words)
        assert r.headers["www-authenticate"] == "Bearer"


def service_ward_path(c: TestClient) -> tuple[Path, Service]:
    return c.app.state.service.path, c.app.state.service


def test_health_is_open_and_keys_work_in_both_headers(client):
    c, keys = client
    assert c.get("/healthz").json() == {"status": "ok"}
    ready = c.get("/readyz", headers=auth(keys["c0"])).json()
    assert ready["ready"] is True
    assert "pending_forgets" not in ready and "retraining" not in ready  # whether someone asked to be forgotten: admins only
    assert c.get("/readyz", headers=auth(keys["admin"])).json()["pending_forgets"] == 0
    assert c.get("/readyz", headers={"X-API-Key": keys["c0"]}).status_code == 200


def test_revoking_takes_effect_on_the_next_request(ward_copy):
    path, keys = ward_copy
    with TestClient(create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads")) as c:
        assert c.get("/v1/compartments", headers=auth(keys["c1"])).status_code == 200
        ward = Ward.open(path, worker=True)
        ward.ledger.revoke_key("c1")  # as `dataward keys WARD revoke c1` does, from another process
        ward.close()
        assert_clean_error(c.get("/v1/compartments", headers=auth(keys["c1"])), 401, "revoked")


def test_an_admin_key_without_compartments_may_forget_but_not_generate(ward_copy):
    path, keys = ward_copy
    ward = Ward.open(path, worker=True)
    _, forgetter = ward.ledger.create_key("forget-only", [], admin=True)
    ward.close()
    with TestClient(create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads")) as c:
        assert_clean_error(c.post("/v1/generate", headers=auth(forgetter), json={"n": 1, "steps": STEPS}), 403, "no compartment")
        assert c.get("/v1/compartments", headers=auth(forgetter)).json()["compartments"] == []
        assert c.app.state.service.admitted == 0


def test_admin_endpoints_refuse_other_keys(client):
    c, keys = client
    assert_clean_error(c.post("/v1/forget", headers=auth(keys["c0"]), json={"ids": ["digits:0000"]}), 403, "admin")
    assert_clean_error(c.get("/v1/forget/whatever", headers=auth(keys["c0"])), 403, "admin")


# grants --------------------------------------------------------------------------------------------------------------
GRANT_BODIES = [
    {}, {"weights": "density"}, {"sampler": "ddpm"}, {"top_k": 1}, {"top_k": 2, "label": 3}, {"format": "npz"}, {"grid": True}, {"seed": 7},
]


@pytest.mark.parametrize("body", GRANT_BODIES)
@pytest.mark.parametrize("name,grant", [("c0", [0]), ("c1", [1])])
def test_a_key_never_reaches_outside_its_grant(client, body, name, grant):
    c, keys = client
    r = c.post("/v1/generate", headers=auth(keys[name]), json={"n": 2, "steps": STEPS} | body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["compartments"] == grant and out["allowed"] == grant
    assert set(out["models"]) == {str(g) for g in grant} and out["shared_models"] == []
    for sample in out["samples"]:
        assert set(sample["attribution"]) == {str(g) for g in grant}
        assert sum(sample["attribution"].values()) == pytest.approx(1.0, abs=1e-5)  # all the mass inside the grant
        if "png" in sample:
            assert Image.open(io.BytesIO(base64.b64decode(sample["png"]))).size == (8, 8)
    if body.get("format") == "npz":
        arrays = np.load(io.BytesIO(base64.b64decode(out["npz"])), allow_pickle=False)
        assert arrays["images"].shape == (2, 1, 8, 8) and arrays["attribution"].shape == (2, 1)
        assert arrays["compartments"].tolist() == grant
    if body.get("grid"):
        assert "grid_png" in out and all("png" not in s for s in out["samples"])
        # issue 36: 2 samples of 8x8 as a grid were a raw 21x11 image; each is now upscaled 8x (2x1 grid, 2 px padding)
        assert Image.open(io.BytesIO(base64.b64decode(out["grid_png"]))).size == (2 * (64 + 2) + 2, 64 + 4)


def test_a_key_gets_bit_for_bit_the_samples_of_its_compartment_alone(client, service_ward):
    """Guarantee 4: key {0} gets exactly what sampling compartment 0 alone gives: compartment 1 has no influence at all."""
    c, keys = client
    r = c.post("/v1/generate", headers=auth(keys["c0"]), json={"n": 3, "steps": STEPS, "seed": 11, "format": "npz"})
    served = np.load(io.BytesIO(base64.b64decode(r.json()["npz"])), allow_pickle=False)["images"]
    torch.set_num_threads(1)  # the app's torch_threads: bit-exactness holds at the same thread count
    ward = Ward.open(service_ward[0], worker=True)
    alone = ward.sample(3, seed=11, steps=STEPS, allowed=[0]).images.numpy()
    both = ward.sample(3, seed=11, steps=STEPS, allowed=[0, 1]).images.numpy()
    ward.close()
    assert np.array_equal(served, alone)
    assert not np.array_equal(served, both)


def test_the_body_cannot_widen_the_grant(client):
    c, keys = client
    for smuggled in ({"allow": [1]}, {"allowed": [0, 1]}, {"compartments": [1]}, {"key": keys["admin"]}):
        assert_clean_error(c.post("/v1/generate", headers=auth(keys["c0"]), json={"n": 1} | smuggled), 422, "unknown field")
    assert_clean_error(c.post("/v1/generate", headers=auth(keys["c0"]), json={"n": 1, "weights": "router"}), 403, "router", "density")


def test_router_only_for_keys_that_reach_everything(client):
    c, keys = client
    out = c.post("/v1/generate", headers=auth(keys["admin"]), json={"n": 2, "steps": STEPS, "weights": "router"}).json()
    assert out["weights"] == "router" and out["shared_models"] == ["router"] and out["compartments"] == [0, 1]
    for sample in out["samples"]:
        assert sum(sample["attribution"].values()) == pytest.approx(1.0, abs=1e-5)


def test_compartments_lists_only_the_grant(client):
    c, keys = client
    out = c.get("/v1/compartments", headers=auth(keys["c1"])).json()
    assert [x["id"] for x in out["compartments"]] == [1]
    # a customer sees no live count, stage or fallback: they change when someone else is forgotten (issue 35 item 14)
    assert out["compartments"][0]["serving"] == "served" and not {"samples", "model"} & set(out["compartments"][0])
    assert out["weights"] == {"default": "density", "router_allowed": False}
    admin = c.get("/v1/compartments", headers=auth(keys["admin"])).json()
    assert admin["weights"]["router_allowed"] is True
    assert all(x["samples"] > 0 and x["serving"] == "complete" and "model" in x for x in admin["compartments"])


# limits --------------------------------------------------------------------------------------------------------------
def test_limits_and_bad_input_are_clear_4xx(client):
    c, keys = client
    h = auth(keys["c0"])
    assert_clean_error(c.post("/v1/generate", headers=h, json={"n": 10_000}), 422, "n must be at most 64")
    assert_clean_error(c.post("/v1/generate", headers=h, json={"steps": 100_000}), 422, "steps must be at most")
    assert_clean_error(c.post("/v1/generate", headers=h, json={"n": 0}), 422, "n")
    assert_clean_error(c.post("/v1/generate", headers=h, json={"n": "3"}), 422, "n")
    assert_clean_error(c.post("/v1/generate", headers=h, json={"sampler": "euler"}), 422, "sampler")
    assert_clean_error(c.post("/v1/generate", headers=h, json={"n": 1, "steps": STEPS, "label": 99}), 400, "label")
    no_guard = c.post("/v1/generate", headers=h, json={"n": 1, "steps": STEPS, "guard": True})
    assert_clean_error(no_guard, 400, "guard", "`dataward guard WARD`")
    path, _ = service_ward_path(c)
    assert str(path.parent) not in no_guard.text and str(path.resolve().parent) not in no_guard.text  # no server path leaks
    density_ddim = {"n": 1, "steps": STEPS, "weights": "density", "sampler": "ddim"}
    assert_clean_error(c.post("/v1/generate", headers=auth(keys["admin"]), json=density_ddim), 400, "ddpm")
    assert_clean_error(c.post("/v1/generate", headers=h | {"content-type": "application/json"}, content=b"{not json"), 422, "invalid JSON")
    assert_clean_error(c.post("/v1/generate", headers=h | {"content-type": "application/json"}, content=b"[1, 2]"), 422, "invalid request")
    assert_clean_error(c.post("/v1/generate", headers=h, content=b"x" * (ServiceLimits().max_body_bytes + 1)), 413, "too large")
    assert_clean_error(c.post("/v1/forget", headers=auth(keys["admin"]), json={"ids": []}), 422, "ids")
    assert_clean_error(c.post("/v1/forget", headers=auth(keys["admin"]), json={"ids": ["x" * 600]}), 422, "ids")
    assert_clean_error(c.get("/v1/nothing-here", headers=h), 404, "Not Found")
    assert_clean_error(c.get("/v1/compartments?api_key=" + keys["c0"]), 400, "no query parameters", "never in a URL")
    assert_clean_error(c.get("/v1/compartments?x=1", headers=h), 400, "no query parameters")


def test_streamed_bodies_are_limited_too(client):
    c, keys = client

    def chunks():
        for _ in range(ServiceLimits().max_body_bytes // (64 * 1024) + 2):
            yield b"x" * (64 * 1024)

    assert_clean_error(c.post("/v1/generate", headers=auth(keys["c0"]), content=chunks()), 413, "too large")


# forgetting ----------------------------------------------------------------------------------------------------------
def wait_done(c, request_id: str, headers: dict, timeout: float = 90.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = c.get(f"/v1/forget/{request_id}", headers=headers).json()
        if state["state"] == "done":
            return state
        time.sleep(0.2)
    raise AssertionError(f"forget {request_id} not done after {timeout} s: {state}")


def test_forget_flow(ward_copy):
    path, keys = ward_copy
    admin = auth(keys["admin"])
    target = id_in(path, 0, 0)
    with TestClient(create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads")) as c:
        assert_clean_error(c.post("/v1/forget", headers=admin, json={"ids": [target, "digits:nope"]}), 404, "digits:nope", "nothing was forgotten")
        assert_clean_error(c.get("/v1/forget/000000000000", headers=admin), 404, "unknown forget request")
        r = c.post("/v1/forget", headers=admin, json={"ids": [target]})
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted["state"] == "accepted" and accepted["ids"] == [target] and accepted["quarantined_models"] > 0 and accepted["erased"]
        assert r.headers["location"] == f"/v1/forget/{accepted['request']}"
        # in effect before the 202: the ledger already says so, and no served model saw the ID
        ward = Ward.open(path, worker=True)
        assert target in ward.ledger.forgotten_ids()
        assert not forgotten_seen(path, [m.id for m in ward.ledger.models(status="ready", any_compartment=True)])
        ward.close()
        state = wait_done(c, accepted["request"], admin)
        assert state["ids"] == [target] and state["finished_at"] is not None and state["retraining"] is False and state["erased"] is True
        out = c.post("/v1/generate", headers=auth(keys["c0"]), json={"n": 2, "steps": STEPS}).json()
        assert out["compartments"] == [0] and not forgotten_seen(path, [out["models"]["0"]["model"]])
        again = c.post("/v1/forget", headers=admin, json={"ids": [target]})
        assert again.status_code == 200 and again.json()["state"] == "noop"


def test_a_reader_holding_a_snapshot_delays_no_202_and_the_state_says_when_erasure_followed(ward_copy):
    """Issue 35 item 1: with an outside read transaction held on ledger.sqlite, both forgets are answered while it holds
    its snapshot (the second not queued behind the first's erasure), say "erased": false, and erasure follows its release."""
    path, keys = ward_copy
    admin = auth(keys["admin"])
    reader = sqlite3.connect(path / "ledger.sqlite", isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM samples").fetchone()
    with TestClient(create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads")) as c:
        answers = [c.post("/v1/forget", headers=admin, json={"ids": [id_in(path, compartment, 0)]}) for compartment in (0, 1)]
        assert reader.in_transaction and [r.status_code for r in answers] == [202, 202]
        requests = [r.json()["request"] for r in answers]
        assert [r.json()["erased"] for r in answers] == [False, False]
        assert c.get(f"/v1/forget/{requests[0]}", headers=admin).json()["erased"] is False
        reader.execute("COMMIT")
        reader.close()
        deadline = time.time() + 60
        while time.time() < deadline and not all(c.get(f"/v1/forget/{r}", headers=admin).json()["erased"] for r in requests):
            time.sleep(0.1)
        assert all(c.get(f"/v1/forget/{r}", headers=admin).json()["erased"] for r in requests)


class Gate:
    """Makes the next ``Ward.sample`` call block after sampling until released (deterministic concurrency)."""

    def __init__(self, monkeypatch, calls: int = 1):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = calls
        self.models: list[dict] = []
        original = Ward.sample
        gate = self

        def sample(ward, *args, **kwargs):
            result = original(ward, *args, **kwargs)
            if gate.calls > 0:
                gate.calls -= 1
                gate.models.append(result.models)
                gate.entered.set()
                assert gate.release.wait(60), "the test never released the gate"
            return result

        monkeypatch.setattr(Ward, "sample", sample)


def in_thread(fn, *args, **kwargs) -> dict:
    """Run ``fn`` in a thread; the returned dict gets "result" (or "error") when it ends."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001
            box["error"] = error

    box["thread"] = threading.Thread(target=run, daemon=True)
    box["thread"].start()
    return box


def test_no_response_after_the_202_uses_a_model_that_saw_the_ids(ward_copy, monkeypatch):
    """A generation that sampled with a model, then a forget of an ID that model saw lands: the response is re-run."""
    path, keys = ward_copy
    target = id_in(path, 0, 1)  # slice 1: compartment 0 falls back to its stage-1 checkpoint while retraining
    gate = Gate(monkeypatch)
    with TestClient(create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads")) as c:
        box = in_thread(c.post, "/v1/generate", headers=auth(keys["c0"]), json={"n": 2, "steps": STEPS, "seed": 3})
        assert gate.entered.wait(60)
        first_model = gate.models[0][0]["model"]
        r = c.post("/v1/forget", headers=auth(keys["admin"]), json={"ids": [target]})
        assert r.status_code == 202
        assert forgotten_seen(path, [first_model]) == {first_model}  # the generation did use a model that saw the ID
        gate.release.set()
        box["thread"].join(60)
        response = box["result"]
        assert response.status_code == 200, response.text
        assert response.headers["x-dataward-attempts"] == "2"
        used = response.json()["models"]["0"]["model"]
        assert used != first_model and not forgotten_seen(path, [used])
        wait_done(c, r.json()["request"], auth(keys["admin"]))


def test_a_generation_that_cannot_be_rerun_answers_503(ward_copy, monkeypatch):
    path, keys = ward_copy
    target = id_in(path, 0, 1)
    gate = Gate(monkeypatch)
    with TestClient(create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads", limits=ServiceLimits(max_attempts=1))) as c:
        box = in_thread(c.post, "/v1/generate", headers=auth(keys["c0"]), json={"n": 1, "steps": STEPS})
        assert gate.entered.wait(60)
        assert c.post("/v1/forget", headers=auth(keys["admin"]), json={"ids": [target]}).status_code == 202
        gate.release.set()
        box["thread"].join(60)
        assert_clean_error(box["result"], 503, "forget")
        assert int(box["result"].headers["retry-after"]) >= 1


def test_retraining_never_registers_a_model_that_saw_a_forgotten_id(ward_copy):
    """The race the service closes: a forget lands while a model trains on the ID; that model is never marked ready."""
    path, _ = ward_copy
    trainer = open_retraining_ward(path, worker=True)
    lineage = next(l for l in trainer.lineages() if l.kind == "denoiser" and l.compartment == 0)
    job = trainer.plan(lineage, from_scratch=True)
    ids = list(lineage.stage_ids[0])
    (path / "models" / "denoiser-c0-s0-trained").mkdir()  # stands in for a checkpoint trained on ``ids`` ...
    results = [{"stage": 0, "folder": "denoiser-c0-s0-trained", "ids": ids, "metadata": {"ids_hash": "h"}}]
    before = {m.id for m in trainer.ledger.models(status=None, any_compartment=True)}
    forgetter = Ward.open(path, worker=True)
    forgetter.accept_forget([ids[0]])  # ... then one of its IDs is forgotten before it is registered
    with pytest.raises(StaleTraining):
        trainer.register(job, results)
    assert {m.id for m in trainer.ledger.models(status=None, any_compartment=True)} == before
    assert not (path / "models" / "denoiser-c0-s0-trained").exists()
    trainer.close()
    forgetter.close()


# overload and shutdown -----------------------------------------------------------------------------------------------
def test_overload_is_answered_429_with_retry_after(ward_copy, monkeypatch):
    path, keys = ward_copy
    gate = Gate(monkeypatch)
    body = {"n": 1, "steps": STEPS}
    with TestClient(create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads")) as c:
        service = c.app.state.service
        running = in_thread(c.post, "/v1/generate", headers=auth(keys["c0"]), json=body)
        assert gate.entered.wait(60)  # the one worker is busy
        queued = in_thread(c.post, "/v1/generate", headers=auth(keys["c1"]), json=body)
        deadline = time.time() + 30
        while service.admitted < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert service.admitted == 2  # one running, one queued: full
        for _ in range(3):
            r = c.post("/v1/generate", headers=auth(keys["c0"]), json=body)
            assert_clean_error(r, 429, "busy")
            assert int(r.headers["retry-after"]) >= 1
        assert c.get("/healthz").status_code == 200  # the event loop is not blocked
        gate.release.set()
        for box in (running, queued):
            box["thread"].join(60)
            assert box["result"].status_code == 200
        assert service.admitted == 0
        assert c.post("/v1/generate", headers=auth(keys["c0"]), json=body).status_code == 200


def test_waiting_in_the_queue_does_not_count_against_the_timeout(service_ward, monkeypatch):
    """Issue 19, defect 5: a request queued behind a long generation used to end in 503 when the wait passed the timeout."""
    path, keys = service_ward
    gate = Gate(monkeypatch)
    body = {"n": 1, "steps": STEPS}
    with TestClient(create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads", limits=ServiceLimits(generate_timeout_s=1.0))) as c:
        running = in_thread(c.post, "/v1/generate", headers=auth(keys["c0"]), json=body)
        assert gate.entered.wait(60)
        queued = in_thread(c.post, "/v1/generate", headers=auth(keys["c1"]), json=body)
        time.sleep(2.0)  # the queued request has waited twice the timeout
        gate.release.set()
        for box in (running, queued):
            box["thread"].join(60)
            assert box["result"].status_code == 200, box["result"].text


def test_a_generation_past_the_timeout_is_stopped_at_its_next_step(service_ward, monkeypatch):
    from dataward.app.service.workers import RunClock

    path, keys = service_ward
    steps_run = []
    original = RunClock.update
    monkeypatch.setattr(RunClock, "update", lambda clock, *a, **k: (steps_run.append(1), original(clock, *a, **k)))
    with TestClient(create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads", limits=ServiceLimits(generate_timeout_s=0.05))) as c:
        r = c.post("/v1/generate", headers=auth(keys["c0"]), json={"n": 64, "steps": 250})
        assert_clean_error(r, 503, "stopped", "fewer images or steps")
        assert c.app.state.service.admitted == 0  # the worker is free: the run ended, not just the request
        assert 1 <= len(steps_run) < 250
        assert c.post("/v1/generate", headers=auth(keys["c0"]), json={"n": 1, "steps": STEPS}).status_code == 200


def test_admission_counts_the_work_ahead(service_ward, monkeypatch):
    """With run times measured, a request that would wait longer than the timeout behind the admitted work is refused at
    once; the estimate grows with n and steps (calls x (a + b n), fitted). The pool's count alone (5 of 5) would admit it."""
    from dataward.app.service.admission import Work

    path, keys = service_ward
    gate = Gate(monkeypatch)
    with TestClient(create_app(path, pool_size=1, queue_size=5, torch_threads=1, worker_kind="threads", limits=ServiceLimits(generate_timeout_s=10.0))) as c:
        pool = c.app.state.service.generations
        for n, per_call in ((1, 0.81), (11, 0.91)):  # as if measured: 0.8 s per call + 0.01 s per image (a slow server)
            pool.run_times.add(Work(n, 3), 3 * per_call)
        assert pool.run_times.estimate(Work(32, 250)) == pytest.approx(250 * (0.8 + 32 * 0.01))
        body = {"n": 2, "steps": 3}  # one compartment: estimated 3 calls x 0.82 s = 2.46 s (runs in milliseconds)
        running = [in_thread(c.post, "/v1/generate", headers=auth(keys["c0"]), json=body)]
        assert gate.entered.wait(60)
        for _ in range(4):  # 2.46 s each: four ahead make 9.84 s <= 10 s; five, 12.3 s > 10 s
            before = pool.admitted
            running.append(in_thread(c.post, "/v1/generate", headers=auth(keys["c0"]), json=body))
            deadline = time.time() + 30
            while pool.admitted == before and time.time() < deadline:
                time.sleep(0.01)
        assert pool.admitted == 5 and pool.admitted_seconds == pytest.approx(5 * 2.46)
        refused = c.post("/v1/generate", headers=auth(keys["c0"]), json=body)
        assert_clean_error(refused, 429, "need about 12 s, more than this server's 10 s")
        assert int(refused.headers["retry-after"]) == 13  # ceil(12.3 s)
        gate.release.set()
        for box in running:
            box["thread"].join(120)
            assert box["result"].status_code == 200
        assert pool.admitted == 0 and pool.admitted_seconds == pytest.approx(0, abs=1e-9)
        assert len(pool.run_times.runs) == 2 + 5  # learned from the runs that finished


class RecordingHandler(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_real_uvicorn_serves_and_shuts_down_gracefully(ward_copy, monkeypatch):
    """Over a real socket on 127.0.0.1: a generation in flight when shutdown starts still gets its 200; then the port closes."""
    path, keys = ward_copy
    app = create_app(path, pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads")
    with live_server(app, log_level="info", timeout_graceful_shutdown=30) as (base, server, thread):
        access_log: list[str] = []  # what uvicorn's access log writes (its config was applied as the server was made)
        logging.getLogger("uvicorn.access").addHandler(RecordingHandler(access_log))
        with httpx.Client(base_url=base, timeout=60) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            assert http.get("/v1/compartments").status_code == 401
            assert http.get(f"/v1/compartments?key={keys['c1']}").status_code == 400
            assert any("/v1/compartments HTTP/1.1\" 400" in line for line in access_log), access_log
            assert not any(keys["c1"] in line for line in access_log)  # the key sent in the URL is never logged
            r = http.post("/v1/generate", headers={"X-API-Key": keys["c1"]}, json={"n": 2, "steps": STEPS})
            assert r.status_code == 200 and r.json()["compartments"] == [1]
        gate = Gate(monkeypatch)
        box = in_thread(httpx.post, f"{base}/v1/generate", headers={"X-API-Key": keys["c0"]}, json={"n": 1, "steps": STEPS}, timeout=60)
        assert gate.entered.wait(60)
        server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        gate.release.set()
        box["thread"].join(60)
        assert box["result"].status_code == 200  # finished, not dropped
        thread.join(60)
        assert not thread.is_alive()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/healthz", timeout=5)
