"""The ledger in PostgreSQL (docs/scale-out.md "Past one machine"): the same behaviour as the SQLite ledger, a ward moved
into it (`dataward ledger WARD move URL`) that trains, samples and forgets, and clear errors on bad URLs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from dataward.app.cli import app
from dataward.errors import DatawardError, LedgerUnavailable
from dataward.store.database import LEDGER_FILE, LEDGER_URL_FILE, check_ledger_url
from dataward.store.ledger import Ledger
from dataward.store.move import move_ledger
from dataward.ward import Ward

IMAGE = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 8, 8)


def ledger_story(ledger: Ledger) -> dict:
    """One ledger through a ward's life (samples, models, a forget racing a registration, keys, meta); what it shows."""
    rows = [(f"s{i}", i % 3, i % 2, i // 4, "test", None, IMAGE * (i + 1) / 10) for i in range(8)]
    ledger.add_samples(rows, {0: "test", 1: "test"}, "samples-added")
    with pytest.raises(DatawardError, match="already in the ward: s1"):
        ledger.add_samples(rows[1:3] + [("new", 0, 0, 0, "test", None, IMAGE)], {}, "samples-added")
    ids0 = [r[0] for r in ledger.samples(0, images=False)]
    m0 = ledger.register_model("denoiser", 0, 0, "models/a", ids0, "h0", {"steps": 4})
    m1 = ledger.register_model("denoiser", 1, 0, "models/b", [r[0] for r in ledger.samples(1, images=False)], "h1", {})
    router = ledger.register_model("router", None, 0, "models/r", ids0, "hr", {})
    quarantined = ledger.accept_forget("req-1", ["s2"])
    late = ledger.register_model("denoiser", 0, 1, "models/c", ids0, "h2", {})  # trained before the forget: born quarantined
    key_id, raw = ledger.create_key("alice", [0])
    ledger.revoke_key("alice")
    ledger.set_meta("k", "one")
    ledger.set_meta("k", "two", event="meta-set")
    ledger.finish_forgets(["req-1"])
    images = {r[0]: np.frombuffer(r[4], dtype=np.float32) for r in ledger.samples(0)}
    return {
        "compartments": ledger.compartments(), "counts": ledger.counts(), "ids0": ids0,
        "models": [(m.id, m.kind, m.compartment, m.status) for m in ledger.models(any_compartment=True, status=None)],
        "ready": [(m.id, m.kind) for m in ledger.models("router")] + [(m.id, m.kind) for m in ledger.models("denoiser", 1)],
        "quarantined": quarantined, "late": late, "tainted": ledger.tainted_models([m0, m1, router, late]),
        "ready_of": sorted(ledger.ready_models([m0, m1, router, late])), "forgotten": ledger.forgotten_ids(),
        "request": {k: v for k, v in ledger.forget_request("req-1").items() if k in ("ids", "state")},
        "key": (key_id, ledger.key_for_hash(Ledger.hash_key(raw))["revoked_at"] is not None, len(ledger.list_keys())),
        "meta": ledger.get_meta("k"), "latest": ledger.latest_model_id(), "forget_count": ledger.forget_count(),
        "events": [e["kind"] for e in reversed(ledger.events())], "image_sums": {k: float(v.sum()) for k, v in images.items()},
        "saw": sorted(ledger.model_sample_ids(m0)),
    }


def test_the_ledger_in_postgres_behaves_as_in_sqlite(postgres, tmp_path):
    sqlite = Ledger(tmp_path / LEDGER_FILE, create=True)
    server = Ledger(postgres(), create=True)
    in_sqlite, in_postgres = ledger_story(sqlite), ledger_story(server)
    assert in_postgres == in_sqlite
    assert in_postgres["quarantined"] == [1, 3] and in_postgres["tainted"] == [1, 3, 4]  # the forgotten s2 (compartment 0)
    assert [status for *_, status in in_postgres["models"]] == ["quarantined", "ready", "quarantined", "quarantined"]
    assert "s2" not in in_postgres["image_sums"] and in_postgres["counts"][0]["forgotten"] == 1
    assert in_postgres["meta"] == "two" and in_postgres["request"] == {"ids": ["s2"], "state": "done"}
    with pytest.raises(Exception, match="append-only"):  # the event log refuses changes in PostgreSQL too
        server.db.execute("UPDATE events SET kind='x'")
    with pytest.raises(Exception, match="append-only"):
        server.db.execute("TRUNCATE events")
    for ledger in (sqlite, server):
        ledger.close()


def test_bad_ledger_urls_get_clear_errors(postgres):
    with pytest.raises(DatawardError, match="never stores secrets"):
        Ledger("postgresql://dataward:hunter2@127.0.0.1:5432/w")
    for bad in ("postgresql://dataward:hunter2@[db/w", "mysql://dataward:hunter2@db/w"):  # never echoes the password
        with pytest.raises(DatawardError) as refused:
            check_ledger_url(bad)
        assert "hunter2" not in str(refused.value) and "URL" in str(refused.value)
    with pytest.raises(DatawardError, match="names no database"):
        Ledger("postgresql://dataward@127.0.0.1:5432")
    with pytest.raises(LedgerUnavailable, match="cannot reach the ledger database"):
        Ledger("postgresql://dataward@127.0.0.1:1/w")
    with pytest.raises(DatawardError, match="not a readable dataward ledger"):
        Ledger(postgres())  # an empty database is not a ledger
    url = postgres()
    Ledger(url, create=True).close()
    with pytest.raises(DatawardError, match="already holds a dataward ledger"):
        Ledger(url, create=True)


def test_a_ward_moved_into_postgres_samples_the_same_bytes_forgets_and_retrains(trained_ward_dir, postgres, tmp_path):
    path = tmp_path / "w"
    shutil.copytree(trained_ward_dir, path)
    before = Ward.open(path)
    expected, status = before.sample(4, seed=3), before.status()
    url = postgres()
    refused = CliRunner().invoke(app, ["ledger", str(path), "move", url])  # a process (a server) has the ward open
    assert refused.exit_code == 1 and "is open in another process" in str(refused.exception) and (path / LEDGER_FILE).exists()
    before.close()
    result = CliRunner().invoke(app, ["ledger", str(path), "move", url])
    assert result.exit_code == 0, result.output
    assert "now lives in" in result.output and not (path / LEDGER_FILE).exists()
    assert (path / LEDGER_URL_FILE).read_text().strip() == url
    ward = Ward.open(path)
    moved = ward.status()
    assert moved.ledger == url and replace(moved, ledger=status.ledger, disk_bytes=status.disk_bytes) == status  # no ledger.sqlite now
    assert np.array_equal(ward.sample(4, seed=3).images, expected.images)  # the same models, found through the new ledger
    target = ward.ledger.samples(1, images=False)[0][0]
    result = ward.forget([target])
    assert result.state == "done" and result.erased and ward.ledger.unerased_forgets() == []  # VACUUM, after the commit
    assert ward.ledger.forgotten_ids() == [target]
    assert all(target not in ward.ledger.model_sample_ids(m.id) for m in ward.ledger.models("denoiser", 1))
    assert ward.status().forgotten == 1
    ward.close()
    listed = CliRunner().invoke(app, ["status", str(path), "--json"])
    assert json.loads(listed.output)["ledger"] == url


def test_an_interrupted_move_refuses_to_open_until_it_is_finished(trained_ward_dir, postgres, tmp_path):
    path = tmp_path / "w"
    shutil.copytree(trained_ward_dir, path)
    url = postgres()
    with pytest.raises(DatawardError, match="never stores secrets"):
        move_ledger(path, url.replace("dataward@", "dataward:secret@"))
    assert (path / LEDGER_FILE).exists() and not (path / LEDGER_URL_FILE).exists()  # a refused move changes nothing
    Ledger(path / LEDGER_FILE).copy_into(url)  # the move's steps 1 and 2, then a crash before step 3
    (path / LEDGER_URL_FILE).write_text(url + "\n")
    with pytest.raises(DatawardError, match="was interrupted; run it again with the same URL"):
        Ward.open(path)
    with pytest.raises(DatawardError, match="already lives in"):
        move_ledger(path, url + "x")
    assert move_ledger(path, url) == {"ledger": url, "rows": 0, "finished": True}
    assert not (path / LEDGER_FILE).exists()
    ward = Ward.open(path)
    assert ward.status().ledger == url and ward.status().samples == 60
    ward.close()
    with pytest.raises(DatawardError, match="nothing to move"):
        move_ledger(path, url)


def test_a_dropped_connection_is_made_anew_and_a_transaction_it_cut_leaves_nothing(postgres):
    import psycopg

    url = postgres()
    ledger = Ledger(url, create=True)
    ledger.add_samples([("s0", 0, 0, 0, "test", None, IMAGE)], {0: "test"}, "samples-added")

    def drop_connection():  # what a server restart or a failover does to this replica's connection
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (ledger.db.db.info.backend_pid,))

    drop_connection()
    assert ledger.compartments() == [0]  # a read after the drop: a new connection, the same answer
    with pytest.raises(LedgerUnavailable, match="was lost during a change"):
        with ledger.transaction() as db:
            db.execute("INSERT INTO compartments VALUES (1, 'x', 0)")
            drop_connection()
            db.execute("INSERT INTO compartments VALUES (2, 'x', 0)")
    assert ledger.compartments() == [0]  # the cut transaction left nothing
    ledger.add_samples([("s1", 0, 1, 0, "test", None, IMAGE)], {1: "test"}, "samples-added")
    assert ledger.compartments() == [0, 1] and ledger.counts()[1]["samples"] == 1
    ledger.close()


def test_a_replica_whose_ledger_is_down_answers_503_and_recovers_by_itself(service_ward, postgres, tmp_path):
    import psycopg
    from fastapi.testclient import TestClient

    from dataward.app.service import create_app
    from test_service import STEPS, assert_clean_error, auth

    path, keys = service_ward
    shutil.copytree(path, tmp_path / "ward")
    url = postgres()
    move_ledger(tmp_path / "ward", url)
    name = url.rsplit("/", 1)[1]
    server = url.rsplit("/", 1)[0] + "/postgres"

    def allow_connections(allowed: bool):  # the ledger's database goes down (its connections cut) or comes back
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS {str(allowed).lower()}")
            if not allowed:
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))

    body = {"n": 1, "steps": STEPS, "seed": 0}
    with TestClient(create_app(tmp_path / "ward", pool_size=1, queue_size=1, torch_threads=1, worker_kind="threads")) as c:
        served = c.post("/v1/generate", headers=auth(keys["c0"]), json=body)
        assert served.status_code == 200
        allow_connections(False)
        try:
            down = c.post("/v1/generate", headers=auth(keys["c0"]), json=body)
            assert_clean_error(down, 503, "ledger cannot be reached")  # fail closed: nothing it could not check
            assert down.headers["retry-after"] == "5"
            assert_clean_error(c.post("/v1/forget", headers=auth(keys["admin"]), json={"ids": ["x"]}), 503, "ledger")
            assert c.get("/healthz").status_code == 200  # the process lives on
        finally:
            allow_connections(True)
        again = c.post("/v1/generate", headers=auth(keys["c0"]), json=body)  # no restart: each connection is made anew
        assert again.status_code == 200
        assert [s["png"] for s in again.json()["samples"]] == [s["png"] for s in served.json()["samples"]]  # same seed, same image


def test_init_can_put_a_new_wards_ledger_in_postgres_and_leaves_nothing_on_a_bad_url(postgres, tmp_path):
    refused = CliRunner().invoke(app, ["init", str(tmp_path / "bad"), "--data", "digits:subset=40", "--ledger", "postgresql://u:pw@h/d"])
    assert isinstance(refused.exception, DatawardError) and "never stores secrets" in str(refused.exception)
    assert not (tmp_path / "bad").exists()
    url = postgres()
    made = CliRunner().invoke(app, ["init", str(tmp_path / "w"), "--data", "digits:subset=40", "-k", "2", "--ledger", url])
    assert made.exit_code == 0, made.output
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [LEDGER_URL_FILE, "models", "ward.json", "writer.lock"]
    ward = Ward.open(tmp_path / "w")
    assert ward.status().ledger == url and ward.status().samples == 40 and ward.compartments() == [0, 1]
    ward.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgres"])
def test_no_model_stays_ready_with_a_forgotten_id_when_forgets_race_registrations(engine, request, tmp_path):
    """Two connections at once, as two replicas have them: one registers models on the IDs it read as live (a training
    that finishes), the other forgets IDs one by one. Afterwards no ready model saw a forgotten ID."""
    import random
    import threading

    location = tmp_path / LEDGER_FILE if engine == "sqlite" else request.getfixturevalue("postgres")()
    setup = Ledger(location, create=True)
    setup.add_samples([(f"s{i:03d}", 0, 0, 0, "test", None, IMAGE) for i in range(120)], {0: "test"}, "samples-added")
    setup.close()
    errors: list[BaseException] = []

    def trainer():
        ledger, pick = Ledger(location), random.Random(1)
        try:
            for n in range(60):
                live = [r[0] for r in ledger.samples(0, images=False)]
                ledger.register_model("denoiser", 0, 0, f"models/m{n}", pick.sample(live, min(30, len(live))), f"h{n}", {})
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
        finally:
            ledger.close()

    def forgetter():
        ledger = Ledger(location)
        try:
            for n in range(40):
                ledger.accept_forget(f"req-{n}", [f"s{3 * n:03d}"])
        except BaseException as error:  # noqa: BLE001
            errors.append(error)
        finally:
            ledger.close()

    threads = [threading.Thread(target=trainer), threading.Thread(target=forgetter)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert errors == []
    ledger = Ledger(location)
    forgotten = set(ledger.forgotten_ids())
    ready = ledger.models("denoiser", 0)
    assert len(forgotten) == 40 and len(ledger.models("denoiser", 0, status=None)) == 60
    assert [m.id for m in ready if ledger.model_sample_ids(m.id) & forgotten] == []
    ledger.close()
