"""The ward's guarantees: purity, exact and immediate forgetting, crash safety, continual learning, access rights."""

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from dataward.errors import DatawardError
from dataward.store.checkpoints import WEIGHTS_FILE, weights_hash
from dataward.training.kinds import KINDS
from dataward.ward import Ward, WardHooks

from conftest import make_ward


def served_hashes(ward: Ward) -> dict:
    return {c: weights_hash(ward.path / r.path / WEIGHTS_FILE) for c, r in ward.served().items()}


def files_bytes(ward: Ward, compartment: int) -> dict[str, bytes]:
    out = {}
    for record in ward.ledger.models("denoiser", compartment):
        for f in sorted((ward.path / record.path).iterdir()):
            out[f"{record.path}/{f.name}"] = f.read_bytes()
    return out


def id_in(ward: Ward, compartment: int, slice_: int) -> str:
    return next(r[0] for r in ward.ledger.samples(compartment) if r[3] == slice_)


def test_assignment_is_deterministic_and_stable_under_add(tmp_path):
    a = make_ward(tmp_path / "a", compartments=3)
    b = make_ward(tmp_path / "b", compartments=3)
    rows_a = {r[0]: (r[2], r[3]) for r in a.ledger.samples()}
    assert rows_a == {r[0]: (r[2], r[3]) for r in b.ledger.samples()}
    assert len({c for c, _ in rows_a.values()}) == 3 and len({s for _, s in rows_a.values()}) == 2
    a.add("printed:count=20", train=False)
    after = {r[0]: (r[2], r[3]) for r in a.ledger.samples()}
    assert all(after[i] == rows_a[i] for i in rows_a)
    assert {after[i][0] for i in after if i.startswith("printed")} == {3}


def test_label_assignment(tmp_path):
    ward = make_ward(tmp_path / "w", compartments=2, by="label")
    for sample_id, label, compartment, *_ in ward.ledger.samples():
        assert compartment == label % 2


def test_forget_is_bitwise_equal_to_training_from_scratch(ward_copy, tmp_path):
    ward = ward_copy
    victim = id_in(ward, 1, 1)
    before = served_hashes(ward)
    untouched = files_bytes(ward, 0)
    result = ward.forget([victim])
    assert result.state == "done" and result.ids == (victim,) and result.erased
    after = served_hashes(ward)
    assert after[0] == before[0] and after[2] == before[2]  # purity: other compartments untouched
    assert after[1] != before[1]
    assert files_bytes(ward, 0) == untouched
    cert = ward.verify()
    assert cert.ok, cert
    assert {(m.kind, m.compartment) for m in cert.models} == {("denoiser", 0), ("denoiser", 1), ("denoiser", 2), ("router", None)}
    # and equal to a brand-new ward made from the data without the ID
    fresh = make_ward(tmp_path / "fresh", compartments=3)
    fresh.accept_forget([victim])
    fresh.train()
    assert served_hashes(fresh) == after
    # the forgotten image is gone from the ledger
    assert ward.ledger.db.execute("SELECT image FROM samples WHERE id=?", (victim,)).fetchone()[0] is None


def test_forget_takes_effect_immediately_with_fallback(ward_copy):
    ward = ward_copy
    victim = id_in(ward, 1, 1)  # slice 1: the stage-0 checkpoint never saw it
    result = ward.accept_forget([victim])
    assert result.state == "accepted"
    assert result.serving_during_retraining["1"].startswith("fallback: stage 0 checkpoint (stages 0..1)")
    served = ward.served()
    for record in list(served.values()) + list(ward.served("router").values()):
        saw = ward.ledger.model_sample_ids(record.id)
        assert victim not in saw
    assert served[1].stage == 0
    assert ward.status().pending_forgets == [result.request]
    r = ward.sample(4, allowed=[1])  # still serves, from the clean checkpoint
    assert r.models[1]["fallback"] and r.models[1]["stage"] == 0
    # a slice-0 ID leaves the compartment out entirely until retrained
    ward.accept_forget([id_in(ward, 2, 0)])
    assert 2 not in ward.served() and ward.serving_state()["2"].startswith("left out")
    ward.train()
    assert ward.status().pending_forgets == [] and ward.verify().ok


def test_forget_errors_and_noop(ward_copy):
    with pytest.raises(DatawardError, match="unknown sample ID.*nope"):
        ward_copy.forget(["nope", id_in(ward_copy, 0, 0)])
    assert ward_copy.ledger.forgotten_ids() == []  # nothing was forgotten
    victim = id_in(ward_copy, 0, 1)
    ward_copy.accept_forget([victim])
    again = ward_copy.accept_forget([victim])
    assert again.state == "noop" and again.already_forgotten == (victim,) and again.request is None


def test_crash_during_forget_never_serves_a_leaked_model(trained_ward_dir, tmp_path):
    path = tmp_path / "ward"
    shutil.copytree(trained_ward_dir, path)
    # a longer budget so the kill lands while retraining runs
    config = json.loads((path / "ward.json").read_text())
    ward = Ward.open(path)
    victim = id_in(ward, 0, 1)
    ward.close()
    code = (
        "import torch, sys; from dataward.ward import Ward;"
        "w = Ward.open(sys.argv[1]); w.config = __import__('dataclasses').replace(w.config, train=__import__('dataclasses').replace(w.config.train, steps=400));"
        "w.forget([sys.argv[2]])"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), victim])
    db = sqlite3.connect(path / "ledger.sqlite")
    deadline = time.time() + 120
    while time.time() < deadline and not db.execute("SELECT 1 FROM forget_requests").fetchone():
        time.sleep(0.01)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    db.close()
    ward = Ward.open(path)
    assert ward.ledger.pending_forgets(), "the forget must be durable and still pending"
    for record in ward.served().values():
        saw = ward.ledger.model_sample_ids(record.id)
        assert victim not in saw
    ward.sample(2)  # sampling works during the interruption, without the leaked model
    leftovers = [p.name for p in (path / "models").iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []  # opening cleaned any half-written checkpoint
    assert json.loads((path / "ward.json").read_text()) == config
    ward.train()  # the next command completes the forget (with the ward's own budget)
    assert not ward.ledger.pending_forgets()
    assert ward.verify().ok


def test_add_makes_a_new_compartment_and_leaves_others_byte_identical(ward_copy):
    before = {c: files_bytes(ward_copy, c) for c in (0, 1, 2)}
    result = ward_copy.add("printed:count=30")
    assert result.compartments == [3] and result.samples == 30 and result.training.seconds > 0
    assert {c: files_bytes(ward_copy, c) for c in (0, 1, 2)} == before
    assert 3 in ward_copy.served()
    router = ward_copy.served("router")[None]
    assert router.metadata["num_outputs"] == 4
    r = ward_copy.sample(6, weights="router")
    assert r.attribution.shape == (6, 4)


def test_status_is_typed_and_its_asdict_is_the_json_that_status_prints(ward_copy):
    """Issue 30: status was a dict read by string keys in the CLI, the demo and the tests; its fields are the JSON's keys,
    in the order `dataward status --json` printed them."""
    status = ward_copy.status()
    assert status.samples == sum(c["samples"] for c in status.compartments) == len(ward_copy.training_data().ids)
    assert status.config == ward_copy.config and status.pending_forgets == [] and status.router["saw_compartments"] == "all"
    printed = asdict(status)
    assert list(printed) == ["path", "ledger", "config", "compartments", "router", "samples", "forgotten", "pending_forgets",
                             "unerased_forgets", "public_model", "base", "latent", "privacy", "exports", "events", "disk_bytes"]
    assert printed["config"] == asdict(ward_copy.config) and json.loads(json.dumps(printed, default=str))["samples"] == status.samples


def test_access_rights_are_exact_with_density_weights(ward_copy):
    ward = ward_copy
    reference = ward.sample(6, allowed=[0, 2], seed=7, steps=10)
    assert torch.allclose(reference.attribution.sum(1), torch.ones(6), atol=1e-5)
    assert torch.all(reference.attribution[:, 1] == 0) and torch.all(reference.final_weights[:, 1] == 0)
    # replace the excluded compartment's weights by garbage: nothing changes, bit for bit
    weights_file = ward.path / ward.served()[1].path / WEIGHTS_FILE
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(weights_file)).items()}, str(weights_file))
    again = Ward.open(ward.path).sample(6, allowed=[0, 2], seed=7, steps=10)
    assert torch.equal(reference.images, again.images) and torch.equal(reference.attribution, again.attribution)
    with pytest.raises(DatawardError, match="refusing to load the denoiser of compartment 1"):  # ... and using it is refused
        Ward.open(ward.path).sample(6, seed=7, steps=10)


def test_top_k_and_attribution(ward_copy):
    two = ward_copy.sample(8, seed=1, steps=10, top_k=2)  # of K = 3 (top-k = K is the full mixture by definition)
    assert ((two.final_weights > 0).sum(1) <= 2).all() and torch.allclose(two.final_weights.sum(1), torch.ones(8), atol=1e-5)
    sparse = ward_copy.sample(8, seed=1, steps=10, top_k=1)
    assert torch.allclose(sparse.attribution.sum(1), torch.ones(8), atol=1e-5)
    assert ((sparse.final_weights > 0).sum(1) == 1).all()
    routed = ward_copy.sample(8, seed=1, steps=10, weights="router")
    assert routed.sampler == "ddim" and torch.allclose(routed.attribution.sum(1), torch.ones(8), atol=1e-5)


def test_bad_sampling_requests(ward_copy):
    with pytest.raises(DatawardError, match="unknown compartment"):
        ward_copy.sample(2, allowed=[9])
    with pytest.raises(DatawardError, match="label must be between 0 and 9"):
        ward_copy.sample(2, label=12)
    with pytest.raises(DatawardError, match="density weights need the stochastic sampler"):
        ward_copy.sample(2, sampler="ddim", weights="density")
    with pytest.raises(DatawardError, match="n must be at least 1"):
        ward_copy.sample(0)


def test_create_errors_leave_nothing_behind(tmp_path):
    with pytest.raises(DatawardError, match="unknown model preset"):
        Ward.create(tmp_path / "w", "digits:subset=10", model="huge")
    assert not (tmp_path / "w").exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(DatawardError, match="not a ward"):
        Ward.open(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("x")
    with pytest.raises(DatawardError, match="not empty"):
        Ward.create(tmp_path / "x", "digits:subset=10")


def test_event_log_is_append_only(ward_copy):
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        with ward_copy.ledger.transaction() as db:
            db.execute("DELETE FROM events")
    assert ward_copy.ledger.events(100)


def test_a_model_registered_after_a_forget_that_saw_the_id_is_never_served(ward_copy):
    """A training job that started before a forget and registers after it: born quarantined, never served."""
    ward = ward_copy
    lineage = next(l for l in ward.lineages() if l.kind == "denoiser" and l.compartment == 0)
    job = ward.plan(lineage, from_scratch=True)
    results = ward.run_job(job)  # trained on the IDs as they were
    victim = lineage.stage_ids[-1][0]
    ward.accept_forget([victim])
    ward.register(job, results)
    for record in ward.served().values():
        saw = ward.ledger.model_sample_ids(record.id)
        assert victim not in saw


def test_a_checkpoint_that_vanished_before_registration_is_refused(tmp_path):
    ward = make_ward(tmp_path / "w", router=False)
    lineage = next(l for l in ward.lineages() if l.kind == "denoiser")
    job = ward.plan(lineage)
    results = ward.run_job(job)
    shutil.rmtree(ward.path / "models" / results[0]["folder"])  # e.g. another writer removed it as an orphan
    with pytest.raises(DatawardError, match="vanished before it was registered"):
        ward.register(job, results)
    assert ward.served() == {}  # nothing was registered
    ward.train()  # a re-run redoes the job
    assert set(ward.served()) == {0, 1}


def test_hooks_see_every_load_and_can_refuse_a_registration(trained_ward_dir, tmp_path):
    shutil.copytree(trained_ward_dir, tmp_path / "w")
    loaded, offered = [], []

    def refuse(job, results):
        offered.append((job.lineage.kind, job.lineage.compartment, [r["stage"] for r in results]))
        raise RuntimeError("refused")

    ward = Ward.open(tmp_path / "w", hooks=WardHooks(on_load=lambda record: loaded.append(record.id), before_register=refuse))
    served = ward.served()
    ward.sample(2, steps=2, allowed=[0])
    ward.sample(2, steps=2, allowed=[0])  # the second time from the cache: the hook sees it again
    assert loaded == [served[0].id, served[0].id]
    ward.accept_forget([id_in(ward, 1, 1)])
    with pytest.raises(RuntimeError, match="refused"):
        ward.train()
    assert offered == [("denoiser", 1, [1])] and ward.models_missing()  # nothing of the refused job was registered
    ward.close()


def test_drop_unready_models_forgets_what_another_process_quarantined(trained_ward_dir, tmp_path):
    shutil.copytree(trained_ward_dir, tmp_path / "w")
    server, admin = Ward.open(tmp_path / "w"), Ward.open(tmp_path / "w")
    record = server.served()[1]
    model = server.model(record)
    server.drop_unready_models()
    assert server.model(record) is model  # still ready: kept in the cache
    admin.accept_forget([id_in(admin, 1, 0)])  # quarantines it and deletes its files
    assert server.model(record) is model  # the cache does not read the ledger ...
    server.drop_unready_models()  # ... until asked to
    with pytest.raises(DatawardError, match="cannot load model"):
        server.model(record)
    server.close()
    admin.close()


def test_every_model_kind_builds_the_class_its_checkpoints_load_with(tmp_path):
    ward = make_ward(tmp_path / "w", compartments=3)
    for kind in KINDS.values():
        model = kind.build(ward.planner.context, 0)
        assert type(model) is kind.model_class, kind.name
    router = KINDS["router"]
    assert router.fits({"num_outputs": 3}, ward.planner.context) and not router.fits({"num_outputs": 2}, ward.planner.context)
    assert {l.kind for l in ward.lineages()} == {"denoiser", "router"} and not any(l.dp for l in ward.lineages())
    ward.close()


def test_a_certificate_check_prints_only_the_fields_that_apply_to_it():
    """Issue 30: verify's checks are typed; `verify --json` prints each as before, without the fields that do not apply."""
    from dataward.certificate import Certificate, ModelCheck

    missing = ModelCheck(kind="router", compartment=None, method="retrained", equal=False, reason="no served model")
    checked = ModelCheck(kind="denoiser", compartment=0, stage=1, model=4, method="retrained", served_sha256="a", scratch_sha256="a",
                         equal=True, saw_forgotten_ids=0)
    assert missing.to_json() == {"kind": "router", "compartment": None, "method": "retrained", "equal": False, "reason": "no served model"}
    assert list(checked.to_json()) == ["kind", "compartment", "stage", "model", "method", "served_sha256", "scratch_sha256", "equal",
                                       "saw_forgotten_ids"]
    assert checked.passed and not missing.passed and not ModelCheck(**{**checked.__dict__, "saw_forgotten_ids": 1}).passed
    assert Certificate(False, 2, "hash-checked", (missing, checked)).to_json() == {
        "ok": False, "forgotten": 2, "public_models": "hash-checked", "models": [missing.to_json(), checked.to_json()]}
