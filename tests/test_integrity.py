"""Model files are checked against the ledger's hash before they are used (issue 19, defect 4); forgotten images leave
every file at once (defect 2)."""

import shutil

import pytest
from conftest import make_ward

from dataward.errors import DatawardError
from dataward.store.checkpoints import WEIGHTS_FILE
from dataward.ward import Ward


def _weights(ward, compartment):
    return ward.path / ward.served()[compartment].path / WEIGHTS_FILE


def test_flipped_weight_bytes_are_refused_by_name(ward_copy):
    path = _weights(ward_copy, 0)
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0x40 for b in data[-4:])  # one float of the last tensor: still a valid safetensors file
    path.write_bytes(bytes(data))
    reopened = Ward.open(ward_copy.path)
    with pytest.raises(DatawardError, match="refusing to load the denoiser of compartment 0 .*the file was changed or replaced"):
        reopened.sample(2, steps=2, allowed=[0])
    assert reopened.sample(2, steps=2, allowed=[1]).images.isfinite().all()  # the intact compartments still serve


def test_another_compartments_weights_copied_in_are_refused(ward_copy):
    shutil.copyfile(_weights(ward_copy, 1), _weights(ward_copy, 0))
    with pytest.raises(DatawardError, match="refusing to load the denoiser of compartment 0"):
        Ward.open(ward_copy.path).sample(2, steps=2, allowed=[0])


def test_a_truncated_weights_file_is_a_clear_error(ward_copy):
    path = _weights(ward_copy, 2)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatawardError, match="cannot load model denoiser from"):
        Ward.open(ward_copy.path).sample(2, steps=2, allowed=[2])


def test_a_forgotten_image_is_in_no_file_of_the_ward_once_the_forget_returns(tmp_path):
    """Erasure is physical at acknowledgement (issue 19, defect 2): with another connection open (a running server), no
    file under the ward (ledger, its write-ahead log, checkpoints) holds the forgotten image's stored bytes."""
    from dataward.store.ledger import Ledger

    ward = make_ward(tmp_path / "w")
    server = Ledger(ward.path / "ledger.sqlite")  # another process's connection, as `dataward serve` keeps one
    server.counts()
    victim = ward.training_data(0).ids[3]
    stored = next(r for r in ward.ledger.samples(0) if r[0] == victim)[4]
    needle = bytes(stored)
    assert len(needle) >= 64 and any(needle in f.read_bytes() for f in ward.path.rglob("*") if f.is_file())
    ward.accept_forget([victim])
    holders = [str(f.relative_to(ward.path)) for f in ward.path.rglob("*") if f.is_file() and needle in f.read_bytes()]
    assert holders == []
    server.counts()  # the other connection still works
    server.close()


def test_a_new_budget_on_a_trained_ward_retrains_and_verify_holds(ward_copy):
    """`train --steps N` on an up-to-date ward (issue 19, defect 7): the models of the old budget are out of date, train
    retrains them with the new one, and the certificate checks the new budget."""
    from dataclasses import replace

    old = {c: r.id for c, r in ward_copy.served().items()}
    ward_copy.reconfigure(train=replace(ward_copy.config.train, steps=6))
    assert ward_copy.models_missing() and ward_copy.served() == {}
    ward_copy.train()
    served = ward_copy.served()
    assert set(served) == set(old) and all(served[c].id != old[c] and served[c].metadata["train"]["steps"] == 6 for c in old)
    assert {r.id for r in ward_copy.ledger.models("denoiser", 0, status="retired")} >= {old[0]}
    assert ward_copy.verify().ok


_HOLD_LOCK = """
import sys, time
from dataward.store.lock import WriterLock
lock = WriterLock(sys.argv[1]); lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_one_writer_at_a_time_and_only_the_writer_removes_orphans(ward_copy, tmp_path):
    """Issue 19, defect 3: while another process writes (holds the lock), opening the ward leaves its half-written
    checkpoint alone, a second train is refused naming the holder, and a forget is still accepted at once."""
    import subprocess
    import sys

    half_written = ward_copy.path / "models" / "denoiser-c0-s1-0badc0de"
    half_written.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(ward_copy.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        Ward.open(ward_copy.path).close()
        assert half_written.is_dir()
        with pytest.raises(DatawardError, match=f"another process is writing to this ward \\(pid {writer.pid}"):
            ward_copy.train()
        result = ward_copy.forget([ward_copy.training_data(0).ids[0]])
        assert result.quarantined_models > 0 and result.retraining_elsewhere is not None and result.state == "accepted"
        assert ward_copy.ledger.pending_forgets()
    finally:
        writer.kill()
        writer.wait()
    ward_copy.train()  # the lock died with its holder (kill -9): training and cleanup go on
    assert not half_written.exists() and not ward_copy.ledger.pending_forgets()


def test_one_rule_for_sample_ids_at_init_and_over_http(tmp_path):
    """Issue 19, defect 9: IDs the API could not forget are refused at init; the body limit fits the documented
    maximum forget (10,000 IDs of 512 ASCII characters)."""
    import json

    import numpy as np

    from dataward.app.service.api import ServiceLimits
    from dataward.assignment import MAX_ID_LENGTH

    images = np.zeros((3, 1, 8, 8), dtype=np.float32)
    for bad in ("", "x" * (MAX_ID_LENGTH + 1), "a\nb"):
        path = tmp_path / f"bad{len(bad)}.npz"
        np.savez(path, images=images, labels=np.array([0, 1, 2]), ids=np.array(["ok-1", bad, "ok-2"]))
        with pytest.raises(DatawardError, match="ID rule"):
            Ward.create(tmp_path / f"w{len(bad)}", f"npz:{path}")
    limits = ServiceLimits()
    body = json.dumps({"ids": ["x" * MAX_ID_LENGTH] * limits.max_forget_ids}).encode()
    assert len(body) <= limits.max_body_bytes


def test_data_cannot_make_memory_unbounded(tmp_path):
    """Issue 19, defect 6: one huge image among small ones is held at a bounded size (and an image above the pixel limit
    is refused by name before it is decoded); an absurd label is refused with its sample ID."""
    import numpy as np
    from PIL import Image

    from dataward.data import MAX_CLASSES, MAX_WORKING_SIDE, load_source

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (3000, 2000), 255).save(folder / "a-huge.png")  # sorted first: it used to set every image's size
    for k in range(3):
        Image.new("L", (8, 8), 40 * k).save(folder / f"b-{k}.png")
    data = load_source(f"folder:{folder}")
    assert data.images.shape == (4, 1, MAX_WORKING_SIDE, MAX_WORKING_SIDE)
    Image.new("L", (8000, 7000), 0).save(folder / "c-too-big.png")
    with pytest.raises(DatawardError, match="c-too-big.png is 8000x7000 pixels"):
        load_source(f"folder:{folder}")
    path = tmp_path / "labels.npz"
    np.savez(path, images=np.zeros((3, 8, 8), dtype=np.float32), labels=np.array([0, 3_000_000, 1]), ids=np.array(["a", "b", "c"]))
    with pytest.raises(DatawardError, match=f"'b' has label 3000000; labels must be below {MAX_CLASSES:,}"):
        load_source(f"npz:{path}")


def test_a_truncated_ledger_is_refused_naming_the_file(ward_copy):
    path = ward_copy.path
    ward_copy.close()
    ledger = path / "ledger.sqlite"
    ledger.write_bytes(ledger.read_bytes()[:2048])
    with pytest.raises(DatawardError, match=r"ledger\.sqlite is not a readable dataward ledger .*restore the ward folder"):
        Ward.open(path)


def test_a_creation_killed_midway_leaves_nothing_the_next_one_keeps(tmp_path):
    """kill -9 during `init` used to leave a hidden staging folder forever; the next creation beside it removes it,
    but never the folder of a creation that is still running (its lock is held)."""
    import subprocess
    import sys

    from dataward.store.lock import new_staging

    killed = subprocess.run([sys.executable, "-c", "import os, signal, pathlib\n"
                             "from dataward.store.lock import new_staging\n"
                             f"staging, _ = new_staging(pathlib.Path({str(tmp_path / 'w')!r}))\n"
                             "(staging / 'half-written').write_text('x')\n"
                             "os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.returncode == -9
    [abandoned] = tmp_path.glob(".w.dataward-staging-*")
    (tmp_path / ".w.backup").mkdir()  # the user's own hidden folder beside the ward
    running, lock = new_staging(tmp_path / "w")  # another creation of the same name, still running
    assert not abandoned.exists() and running.exists()
    try:
        make_ward(tmp_path / "w", data="digits:subset=20")
        assert running.exists()  # its lock is held: left alone
    finally:
        lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".w.backup", running.name, "w"]
