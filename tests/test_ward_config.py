"""ward.json is the one source of truth of a ward's config (issue 35, items 2 and 3): nothing changes it unless the
writer lock is held, and every process that has the ward open follows what another one saved."""

import subprocess
import sys
from dataclasses import replace

import pytest

from dataward.store.lock import WriterBusy, WriterLock
from dataward.ward import Ward

CLI = [sys.executable, "-c", "from dataward.app.cli import main; main()"]


def test_a_change_refused_because_another_process_writes_changes_nothing(ward_copy):
    """Item 3: `train --steps 40` refused ("another process is writing") used to rewrite ward.json first, leaving the
    ward untrained once the other writer finished; the library's changes (guard, add, pretrain, budgets) too."""
    path = ward_copy.path
    config_bytes, counts = (path / "ward.json").read_bytes(), ward_copy.ledger.counts()
    other = WriterLock(path)  # another writer (flock conflicts between two opens of the file, in one process too)
    other.acquire()
    try:
        refused = subprocess.run(CLI + ["train", str(path), "--steps", "40"], capture_output=True, text=True, timeout=300)
        assert refused.returncode == 1 and "another process is writing" in refused.stdout + refused.stderr
        for change in (lambda: ward_copy.enable_guards(train=False), lambda: ward_copy.add("digits:subset=20", train=False),
                       lambda: ward_copy.pretrain("printed:count=40"), lambda: ward_copy.reconfigure(train=replace(ward_copy.config.train, steps=40))):
            with pytest.raises(WriterBusy):
                change()
        assert (path / "ward.json").read_bytes() == config_bytes
        assert ward_copy.ledger.counts() == counts
    finally:
        other.release()
    reopened = Ward.open(path)
    assert not reopened.models_missing() and reopened.config.train.steps == 4  # still trained, on its own budget
    reopened.close()


def test_a_running_process_follows_a_budget_another_process_saved(ward_copy):
    """Item 2: a server that had the ward open answered 503 "not trained" after `train --steps` beside it, and its
    retraining after a forget trained the old budget back, retiring the new models."""
    server = Ward.open(ward_copy.path)  # what `dataward serve` keeps open
    assert set(server.served()) == {0, 1, 2}
    ward_copy.reconfigure(train=replace(ward_copy.config.train, steps=5))  # `dataward train W --steps 5` beside it
    ward_copy.train()
    assert server.config.train.steps == 5
    assert {c: r.id for c, r in server.served().items()} == {c: r.id for c, r in ward_copy.served().items()}
    assert all(r.metadata["train"]["steps"] == 5 for r in server.served().values())
    victim = server.training_data(1).ids[0]
    server.forget([victim])  # the server's retraining keeps the budget the ward has now
    assert not ward_copy.models_missing() and ward_copy.config.train.steps == 5
    assert all(r.metadata["train"]["steps"] == 5 for r in ward_copy.served().values())
    server.close()


def test_ledger_move_refuses_while_another_process_has_the_ward_open(ward_copy, tmp_path):
    """Item 5: `ledger move` beside a running server lost the forgets the server acknowledged afterwards (they went to the
    old file). The move refuses while any connection to the SQLite ledger is open, and changes nothing."""
    from dataward.errors import DatawardError
    from dataward.store.database import LEDGER_FILE, LEDGER_URL_FILE
    from dataward.store.move import move_ledger

    path = ward_copy.path  # ward_copy is open: a running server
    with pytest.raises(DatawardError, match="is open in another process .*stop every process that uses the ward"):
        move_ledger(path, "postgresql://dataward@127.0.0.1:9/nowhere")
    assert (path / LEDGER_FILE).exists() and not (path / LEDGER_URL_FILE).exists()
    victim = ward_copy.training_data(0).ids[0]
    ward_copy.accept_forget([victim])  # the server goes on working, on the ledger it has
    assert Ward.open(path).ledger.forgotten_ids() == [victim]
