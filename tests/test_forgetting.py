"""Forgetting in two steps (accept, finish), physical erasure that no outside reader delays, a trainer that re-plans
when a forget lands mid-training, the retrainer's backoff, and --ids-file lines (issues 30 and 35)."""

import json
import sqlite3
import threading
from dataclasses import FrozenInstanceError, asdict

import pytest
import torch

from dataward.errors import DatawardError
from dataward.forgetting import ForgetResult, UnknownSampleIds
from dataward.ward import Ward, WardHooks

from conftest import make_ward


def id_in(ward: Ward, compartment: int, slice_: int, nth: int = 0) -> str:
    return [r[0] for r in ward.ledger.samples(compartment, images=False) if r[3] == slice_][nth]


def holders(ward: Ward, needle: bytes) -> list[str]:
    """The files under the ward that hold ``needle``."""
    return sorted(str(f.relative_to(ward.path)) for f in ward.path.rglob("*") if f.is_file() and needle in f.read_bytes())


def held_reader(ward: Ward) -> sqlite3.Connection:
    """What a backup tool or an analyst's sqlite3 shell does: a read transaction on ledger.sqlite, held open."""
    reader = sqlite3.connect(ward.path / "ledger.sqlite", isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM samples").fetchone()[0] > 0
    return reader


# issue 30: two named steps, one typed result -------------------------------------------------------------------------
def test_accept_then_finish_give_one_typed_result_whose_asdict_is_the_json(ward_copy):
    victim = id_in(ward_copy, 1, 1)
    with pytest.raises(UnknownSampleIds, match="unknown sample ID.*'alice '"):  # one check, in the library; odd IDs shown quoted
        ward_copy.accept_forget([victim, "alice "])
    assert ward_copy.ledger.forgotten_ids() == []
    accepted = ward_copy.accept_forget([victim, victim])
    assert isinstance(accepted, ForgetResult) and accepted.state == "accepted" and accepted.ids == (victim,) and accepted.erased
    assert ward_copy.ledger.pending_forgets() == [(accepted.request, [victim])]
    with pytest.raises(FrozenInstanceError):
        accepted.state = "done"
    done = ward_copy.finish_forget(accepted)
    assert done.request == accepted.request and done.state == "done" and done.retrain_seconds > 0 and done.retraining_elsewhere is None
    shown = json.loads(json.dumps(asdict(done)))
    assert {"ids", "already_forgotten", "request", "quarantined_models", "serving_during_retraining", "stale_exports", "state",
            "retrain_seconds"} <= set(shown) and shown["ids"] == [victim]
    noop = ward_copy.accept_forget([victim])
    assert (noop.state, noop.request, noop.already_forgotten) == ("noop", None, (victim,)) and ward_copy.finish_forget(noop) == noop


# issue 35 item 1: an outside reader never delays a forget ---------------------------------------------------------------
def test_a_reader_holding_a_snapshot_delays_neither_forget_and_erasure_follows_when_it_lets_go(tmp_path):
    ward = make_ward(tmp_path / "w")
    first, second = ward.training_data(0).ids[3], ward.training_data(1).ids[2]
    needle = bytes(next(r for r in ward.ledger.samples(0) if r[0] == first)[4])
    reader = held_reader(ward)
    a = ward.accept_forget([first])
    b = ward.accept_forget([second])  # never queued behind the first's erasure
    # both completed while the reader still holds its snapshot (it still sees the image) ...
    assert reader.in_transaction and reader.execute("SELECT image FROM samples WHERE id=?", (first,)).fetchone()[0] is not None
    # ... and they say that erasure is still to come, as the ledger and status do
    assert (a.state, a.erased, b.state, b.erased) == ("accepted", False, "accepted", False)
    assert ward.ledger.forget_request(a.request)["erased"] is False
    assert ward.status().unerased_forgets == sorted([a.request, b.request])
    assert holders(ward, needle) != []  # what the reader keeps alive
    reader.execute("COMMIT")
    reader.close()
    assert ward.eraser.wait(timeout=60), "erasure did not follow the reader's release"
    assert ward.ledger.forget_request(a.request)["erased"] and ward.ledger.forget_request(b.request)["erased"]
    assert holders(ward, needle) == [] and ward.status().unerased_forgets == []
    assert [e["kind"] for e in ward.ledger.events(20)].count("forget-erased") == 1
    ward.close()


def test_an_erasure_a_reader_delayed_past_the_process_is_finished_by_the_next_open(tmp_path):
    ward = make_ward(tmp_path / "w")
    victim = ward.training_data(0).ids[0]
    needle = bytes(next(r for r in ward.ledger.samples(0) if r[0] == victim)[4])
    reader = held_reader(ward)
    request = ward.accept_forget([victim]).request
    ward.close()  # the process ends before the reader lets go
    reader.execute("COMMIT")
    reader.close()
    reopened = Ward.open(tmp_path / "w")
    assert reopened.ledger.forget_request(request)["erased"] and holders(reopened, needle) == []
    reopened.close()


# issue 35 item 4: a forget landing mid-training makes the trainer re-plan ---------------------------------------------
def forget_on_first_registration(path, ids: list[str]) -> tuple[WardHooks, list]:
    """Hooks that, when the first job is about to be registered, forget ``ids`` through another connection (as another
    process's `dataward forget` or the service would); the list gets the forget's result."""
    done: list = []

    def before_register(job, results):
        if not done:
            other = Ward.open(path, worker=True)
            done.append(other.accept_forget(ids))
            other.close()

    return WardHooks(before_register=before_register), done


def test_a_forget_between_two_stages_of_a_first_training_replans_and_stays_exact(tmp_path):
    make_ward(tmp_path / "w").close()
    probe = Ward.open(tmp_path / "w")
    victim = id_in(probe, 1, 1)  # compartment 1's job starts after compartment 0's registration; its stage 1 holds the ID
    probe.close()
    hooks, forgot = forget_on_first_registration(tmp_path / "w", [victim])
    ward = Ward.open(tmp_path / "w", hooks=hooks)
    result = ward.train()  # used to die: "the ward's data changed while training denoiser 1 stage 1"
    assert forgot and result.finished_forgets == [forgot[0].request]
    assert not ward.models_missing() and ward.ledger.pending_forgets() == []
    assert all(victim not in ward.ledger.model_sample_ids(r.id) for r in ward.served().values())
    assert ward.verify().ok
    ward.close()


def test_a_forget_that_removes_the_checkpoint_a_retraining_resumes_from_replans(trained_ward_dir, tmp_path):
    import shutil

    shutil.copytree(trained_ward_dir, tmp_path / "w")
    ward = Ward.open(tmp_path / "w")
    ward.accept_forget([id_in(ward, 0, 1), id_in(ward, 1, 1)])  # both retrain from their stage 0 ...
    slice0 = id_in(ward, 1, 0)
    resume_from = [r.path for r in ward.ledger.models("denoiser", 1) if r.stage == 0]
    ward.close()
    hooks, forgot = forget_on_first_registration(tmp_path / "w", [slice0])  # ... until compartment 1's stage 0 is forgotten
    ward = Ward.open(tmp_path / "w", hooks=hooks)
    ward.train()
    assert forgot and not (tmp_path / "w" / resume_from[0]).exists()
    assert not ward.models_missing() and ward.ledger.pending_forgets() == [] and ward.verify().ok
    ward.close()


# issue 35 item 9: the retrainer backs off on an error that stays, and says what it is ----------------------------------
class FailingWard:
    """A ward whose training always fails the same way (as with tampered base weights)."""

    def __init__(self):
        self.ledger = self
        self.seen_delays: list = []
        self.retrainer = None
        self.called = threading.Event()

    def pending_forgets(self):
        return [("r1", ["digits:0001"])]

    def train(self, progress=None):
        self.seen_delays.append(self.retrainer.retry_in_seconds)
        if len(self.seen_delays) >= 5:
            self.called.set()
        raise DatawardError("checkpoint models/public-denoiser-s0 does not hold the weights the ledger recorded")

    def close(self):
        pass


def test_the_retrainer_backs_off_exponentially_and_reports_the_error():
    from dataward.app.service.retraining import Retrainer

    ward = FailingWard()
    retrainer = ward.retrainer = Retrainer(ward, torch_threads=torch.get_num_threads(), backoff=(0.01, 0.04))
    retrainer.start()
    assert ward.called.wait(30)
    assert retrainer.stop(30)
    assert ward.seen_delays[:5] == [None, 0.01, 0.02, 0.04, 0.04]  # used to retry every 0.05 s, for ever
    assert "does not hold the weights" in retrainer.last_error  # used to stay None


# issue 35 item 13: one line of --ids-file is one ID, exactly ----------------------------------------------------------
def test_ids_file_lines_are_ids_exactly(tmp_path):
    from dataward.app.commands.lifecycle import read_ids_file

    path = tmp_path / "ids.txt"
    path.write_bytes("alice \r\n\n bob\nc\u2028d\ne\u0085f\r\nlast".encode())
    assert read_ids_file(path) == ["alice ", " bob", "c\u2028d", "e\u0085f", "last"]
    path.write_bytes(b"\xff\n")
    with pytest.raises(DatawardError, match="not UTF-8"):
        read_ids_file(path)


def test_forget_ids_file_does_not_strip_an_id(tmp_path):
    """A line `alice ` names the ID "alice " (unknown here): nothing is forgotten, the CLI exits 1 naming it."""
    import subprocess
    import sys

    ward = make_ward(tmp_path / "w")
    target = ward.training_data(0).ids[0]
    ward.close()
    (tmp_path / "ids.txt").write_text(f"{target} \n")
    cli = [sys.executable, "-c", "from dataward.app.cli import main; main()"]
    proc = subprocess.run(cli + ["forget", str(tmp_path / "w"), "--ids-file", str(tmp_path / "ids.txt")], capture_output=True, text=True)
    assert proc.returncode == 1 and f"'{target} '" in proc.stdout + proc.stderr
    assert Ward.open(tmp_path / "w").ledger.forgotten_ids() == []
