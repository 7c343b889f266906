"""The Ray executor: same bytes as the local executor, clean retries of a dead worker, clear failures, resumable wards.

One local Ray per module (2 CPUs, no dashboard, its files in a temp dir, HOME pointed at a temp dir so Ray's auth token
never lands in the real home). Failures are injected in the workers through the file DATAWARD_FAULT names (see
dataward.training.executors); the file is rewritten per test, so workers are reused (each worker start imports torch+diffusers).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from dataward.config import TrainConfig
from dataward.errors import DatawardError
from dataward.store.checkpoints import WEIGHTS_FILE, weights_hash
from dataward.ward import Ward, run_job_in_worker

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    """A local 2-CPU Ray for the module; yields the fault file path its workers read."""
    root = tempfile.mkdtemp(prefix="dwray-", dir="/tmp")  # short: Ray's unix sockets live under it
    faults = Path(root) / "faults.json"
    keys = ("HOME", "RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED", "DATAWARD_FAULT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(HOME=os.path.join(root, "home"), RAY_TMPDIR=root, RAY_USAGE_STATS_ENABLED="0", DATAWARD_FAULT=str(faults))
    os.makedirs(os.environ["HOME"])
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=os.path.join(root, "r"), log_to_driver=False)
    try:
        yield faults
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def faults(ray_session):
    """Write the faults the workers inject during one test; none afterwards."""
    yield lambda *spec: ray_session.write_text(json.dumps(list(spec)))
    ray_session.unlink(missing_ok=True)


def make_ward(path: Path) -> Ward:
    return Ward.create(path, "digits:subset=60", compartments=2, slices=2, train=TrainConfig(steps=4), router_train=TrainConfig(steps=2))


def model_hashes(ward: Ward) -> dict[tuple, str]:
    """(kind, compartment, stage) -> weights hash of every ready model; also checks models/ holds nothing else."""
    records = ward.ledger.models(status="ready", any_compartment=True)
    on_disk = sorted(p.name for p in (ward.path / "models").iterdir())
    assert on_disk == sorted(r.path.split("/", 1)[1] for r in records), "models/ holds unregistered folders"
    return {(r.kind, r.compartment, r.stage): weights_hash(ward.path / r.path / WEIGHTS_FILE) for r in records}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[tuple, str]:
    ward = make_ward(tmp_path_factory.mktemp("local") / "ward")
    ward.train(executor="local")
    hashes = model_hashes(ward)
    assert len(hashes) == 2 * 2 + 2  # two denoisers x two stages, router x two stages
    return hashes


def test_ray_from_the_cli_is_bitwise_equal_to_local(ray_session, reference, tmp_path):
    from typer.testing import CliRunner

    from dataward.app.cli import app

    ward = make_ward(tmp_path / "ward")
    result = CliRunner().invoke(app, ["train", str(ward.path), "--executor", "ray", "--cpus-per-job", "1", "--gpus-per-job", "0"])
    assert result.exit_code == 0, result.output
    ward = Ward.open(ward.path)
    assert model_hashes(ward) == reference  # both denoisers and the router (second wave), every stage
    assert all(ward.plan(lineage) is None for lineage in ward.lineages())
    result = CliRunner().invoke(app, ["train", str(ward.path), "--executor", "spark"])
    assert isinstance(result.exception, DatawardError) and "unknown executor 'spark'" in str(result.exception)


def test_ray_workers_use_a_postgres_ledger_and_give_the_same_bytes(ray_session, reference, postgres, tmp_path):
    from dataward.store.move import move_ledger

    make_ward(tmp_path / "ward").close()
    move_ledger(tmp_path / "ward", postgres())
    ward = Ward.open(tmp_path / "ward")
    ward.train(executor="ray")  # each Ray worker opens the ward, and so the PostgreSQL ledger, by itself
    assert ward.status().ledger.startswith("postgresql://") and model_hashes(ward) == reference
    ward.close()


def test_dead_worker_is_retried_and_a_failing_job_is_reported(faults, reference, tmp_path):
    crashed = tmp_path / "crashed-once"
    # both workers die in stage 1, after stage 0's checkpoint folder was written: compartment 0's only on the first
    # attempt (Ray retries it), compartment 1's on every attempt (it fails for good)
    faults({"job": "denoiser:0", "after_steps": 3, "action": "crash", "once": str(crashed)},
           {"job": "denoiser:1", "after_steps": 3, "action": "crash"})
    ward = make_ward(tmp_path / "ward")
    with pytest.raises(DatawardError, match=r"1 of 2 .* denoiser of compartment 1 \(stages 0..1\): its worker died") as error:
        ward.train(executor="ray", max_retries=1)
    assert "compartment 0" not in str(error.value)
    assert crashed.exists(), "the fault was not injected"
    # compartment 0 is registered with the reference bytes; nothing of compartment 1 (no partial folder), no router
    hashes = model_hashes(ward)
    assert hashes == {k: v for k, v in reference.items() if k[:2] == ("denoiser", 0)}
    assert not [p for p in (ward.path / "models").iterdir() if p.name.startswith(".tmp-")]
    # a later local train resumes only what is missing and completes the ward with the same bytes
    reopened = Ward.open(ward.path)
    assert [(j.lineage.kind, j.lineage.compartment) for j in map(reopened.plan, reopened.lineages()) if j] == [("denoiser", 1), ("router", None)]
    reopened.train(executor="local")
    assert model_hashes(reopened) == reference


def test_permanent_error_is_reported_without_retry(faults, tmp_path):
    raised = tmp_path / "raised-once"
    faults({"job": "denoiser:0", "after_steps": 1, "action": "raise", "once": str(raised)})  # a retry would succeed
    ward = make_ward(tmp_path / "ward")
    with pytest.raises(DatawardError, match=r"denoiser of compartment 0 .*RuntimeError: injected fault after 1 steps"):
        ward.train(executor="ray", max_retries=3)
    assert set(model_hashes(ward)) == {("denoiser", 1, 0), ("denoiser", 1, 1)}


def test_missing_ray_and_bad_options_are_clear_errors(monkeypatch):
    from dataward.training.executors import run_on_ray

    with pytest.raises(DatawardError, match="gpus-per-job"):
        list(run_on_ray([], run_job_in_worker, device="cuda", gpus_per_job=0))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(DatawardError, match=r"pip install 'dataward\[ray\]'"):
        list(run_on_ray([], run_job_in_worker))
