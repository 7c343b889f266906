"""Interrupting training (issue 36): SIGINT/SIGTERM exit codes and message, in-stage checkpoints that resume to the same
bytes, training states kept only where a forget can start, loss logs, and the Python API's progress."""

import csv
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_ward
from dataward.store.checkpoints import STATE_FILE, checkpoint_hash
from dataward.training import resume
from dataward.config import TrainConfig
from dataward.training.loop import StageCursor, TrainState
from dataward.training.losslog import LOSS_FILE
from dataward.models.nets import build_unet
from dataward.ward import Ward

LONG = TrainConfig(steps=24, batch_size=16)


def served_hashes(ward: Ward) -> dict:
    return {(kind, c): checkpoint_hash(ward.path / r.path) for kind in ("denoiser", "router") for c, r in ward.served(kind).items()}


class SignalAt:
    """A progress display that sends ``signum`` to this process when the task named ``task`` reaches ``step`` steps."""

    def __init__(self, task: str, step: int, signum: int = signal.SIGINT):
        self.task, self.step, self.signum, self.names, self.done = task, step, signum, {}, {}

    def add_task(self, description, total=None, **fields):
        self.names[len(self.names)] = description
        self.done[len(self.done)] = 0
        return len(self.names) - 1

    def update(self, task, advance=1, **fields):
        self.done[task] += advance
        if self.names[task] == self.task and self.done[task] == self.step:
            os.kill(os.getpid(), self.signum)


def test_interrupted_stage_resumes_to_the_same_bytes(tmp_path):
    """A SIGINT in the middle of a stage stops at the end of that step with an in-stage checkpoint; the next train
    continues from it and every model has the bytes of an uninterrupted run (and one loss row per step)."""
    whole = make_ward(tmp_path / "whole", train=LONG)
    whole.train(progress=False)
    stopped = make_ward(tmp_path / "stopped", train=LONG)
    with pytest.raises(KeyboardInterrupt) as stop:  # plain Python: the signal's own exception, after the state is saved
        stopped.train(progress=SignalAt("train denoiser 1", 17))  # stage 2 of 2 (12 steps each) at its 5th step
    assert "denoiser 1 stage 1 (0..1) is checkpointed at step 5 of 12" in stop.value.__notes__
    saved = tmp_path / "stopped" / "resume" / "denoiser-c1-s1.safetensors"
    assert saved.is_file() and not stopped.served().get(1)
    stopped.train(progress=False)
    assert served_hashes(stopped) == served_hashes(whole) and len(served_hashes(whole)) == 3
    assert not any((tmp_path / "stopped" / "resume").iterdir())  # removed once the stage's folder is written
    rows = list(csv.DictReader((tmp_path / "stopped" / stopped.served()[1].path / LOSS_FILE).open()))
    assert [int(r["stage_step"]) for r in rows] == list(range(1, 13)) and all(math.isfinite(float(r["loss"])) for r in rows)
    assert [int(r["step"]) for r in rows] == list(range(13, 25))


def test_a_checkpoint_of_another_spec_is_never_used(tmp_path):
    model = build_unet("tiny", 8, 1, 10, 0)
    state = TrainState.fresh(model, TrainConfig())
    lineage = make_ward(tmp_path / "w").lineages()[0]
    theirs = resume.StageCheckpoint(tmp_path / "resume", lineage, 0, "spec-a")
    theirs.save(state, StageCursor(3, torch.arange(5), torch.Generator().get_state()))
    assert resume.StageCheckpoint(tmp_path / "resume", lineage, 0, "spec-a").load(state).done == 3
    assert resume.StageCheckpoint(tmp_path / "resume", lineage, 0, "spec-b").load(state) is None
    assert not theirs.path.exists()  # of no use: removed


def test_train_state_only_where_a_forget_can_start_and_loss_logs(tmp_path):
    """R=2: stage 1 of each lineage keeps its training state (a forget in slice 2 retrains from it), the last stage does
    not; a forget from the last slice still retrains to the bytes of a from-scratch run. Every stage logs its loss."""
    ward = make_ward(tmp_path / "w")
    ward.train(progress=False)
    for record in ward.ledger.models(status=None, any_compartment=True):
        folder = ward.path / record.path
        assert (folder / STATE_FILE).is_file() == (record.stage == 0), record
        rows = list(csv.DictReader((folder / LOSS_FILE).open()))
        assert len(rows) == (2 if record.kind == "denoiser" else 1)  # TINY (4 steps) and TINY_ROUTER (2) over 2 stages
        assert all(math.isfinite(float(r["loss"])) and float(r["lr"]) > 0 for r in rows)
    sizes = ward.status().disk_bytes
    assert 0 < sizes["train_states"] < sizes["models"] < sizes["total"] and sizes["resume"] == 0
    rows = ward.ledger.sample_rows(list(ward.training_data().ids))
    ward.forget([next(i for i, (c, s, _) in rows.items() if s == 1)], progress=False)
    assert ward.verify(progress=False).ok


def test_report_to_none_writes_no_loss_log(tmp_path):
    ward = make_ward(tmp_path / "w", compartments=1, router=False)
    ward.train(progress=False, report_to="none")
    assert not list((tmp_path / "w" / "models").glob(f"*/{LOSS_FILE}"))


@pytest.mark.parametrize("at", [3, 4])  # between the two epochs' passes, and inside the second
def test_interrupted_dp_stage_resumes_to_the_same_bytes_and_epsilon(tmp_path, at):
    """A DP stage had no in-stage checkpoint: a SIGINT lost it all. Now it resumes from its checkpoint (state, Poisson
    sampling and noise generators, accountant history) to the bytes and the ε of an uninterrupted run."""
    from dataward.config import DPConfig

    dp = DPConfig(epsilon=10.0, batch=10, epochs=2)  # ~20 examples: 3 logical steps per epoch, 6 in all
    wards = {}
    for name in ("whole", "stopped"):
        wards[name] = make_ward(tmp_path / name, data="digits:subset=40", router=False)
        wards[name].train(progress=False)
    wards["whole"].enable_dp(dp, compartments=[1], progress=False)
    stopped = wards["stopped"]
    with pytest.raises(KeyboardInterrupt) as stop:
        stopped.enable_dp(dp, compartments=[1], progress=SignalAt("DP fine-tune 1", at))
    assert f"DP fine-tuning of compartment 1 is checkpointed at step {at} of 6" in stop.value.__notes__
    assert (tmp_path / "stopped" / "resume" / "denoiser-c1-s0.safetensors").is_file() and 1 not in stopped.served()
    stopped.train(progress=False)
    assert served_hashes(stopped) == served_hashes(wards["whole"])
    whole_record = wards["whole"].privacy()["compartments"]["1"]
    record = stopped.privacy()["compartments"]["1"]
    assert record["epsilon"] == whole_record["epsilon"] and record["history"] == whole_record["history"]
    assert sum(steps for _, _, steps in record["history"]) == 6
    rows = list(csv.DictReader((tmp_path / "stopped" / stopped.served()[1].path / LOSS_FILE).open()))
    assert [int(r["stage_step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert not any((tmp_path / "stopped" / "resume").iterdir())


def test_python_api_shows_progress_by_default(tmp_path, capfd):
    ward = make_ward(tmp_path / "w", compartments=1, router=False, slices=1)
    capfd.readouterr()
    ward.train()
    assert "train denoiser 0: started (0/4)" in capfd.readouterr().err  # stderr is not a terminal here: plain lines
    ward.forget([ward.training_data().ids[0]], progress=False)  # retrains the compartment, silently
    assert ward.served()[0].stage == 0 and capfd.readouterr().err == ""


def run_until_training(args, ward, cwd):
    """Start ``dataward ARGS``; return the process once the first stage has logged a step (it is in the step loop)."""
    proc = subprocess.Popen([sys.executable, "-c", "from dataward.app.cli import main; main()", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = ward / "resume" / "denoiser-c0-s0.csv"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) > 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_train_interrupted_exits_with_the_signal_code(tmp_path, signum, code):
    """Ctrl-C (or SIGTERM) during `dataward train` exits 130 (143) with one line: what is kept, how to resume (it
    exited 0 without a word: typer turned KeyboardInterrupt into a return value the CLI dropped)."""
    ward = tmp_path / "w"
    make_ward(ward, compartments=1, router=False, train=TrainConfig(steps=100000, batch_size=16)).close()
    proc = run_until_training(["train", str(ward)], ward, tmp_path)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"interrupted by {signal.Signals(signum).name}: 0 of 2 stage(s) of the ward are trained and kept; "
                           "denoiser 0 stage 0 (0..1) is checkpointed at step "), line
    assert line.endswith(f"; resume with `dataward train {ward}`") and "Traceback" not in err
    assert (ward / "resume" / "denoiser-c0-s0.safetensors").is_file()


def test_cli_exit_code_of_a_command_that_exits_nonzero(tmp_path, monkeypatch):
    """`typer.Exit(n)` in a command (verify's failed certificate) exits n; it exited 0."""
    from dataward.app import cli
    from dataward.app.commands import lifecycle
    from dataward.certificate import Certificate

    class FailedCertificate:
        def __init__(self, *a, **k):
            pass

        def verify(self, **kwargs):
            return Certificate(ok=False, forgotten=0, public_models="hash-checked", models=())

    monkeypatch.setattr(lifecycle, "open_ward", lambda *a, **k: FailedCertificate())
    monkeypatch.setattr(sys, "argv", ["dataward", "verify", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 1 and signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main() put it back
