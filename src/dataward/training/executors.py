"""Executors: where a ward's training jobs run.

:meth:`dataward.ward.Ward.train` plans one :class:`~dataward.training.planner.TrainJob` per lineage, wave by wave, and
hands them to an executor. ``local`` runs them one after the other in the driver process. :func:`run_on_ray` runs each
job as one Ray task with the ``work`` callable it is given (picklable: a module-level function):

- ``work(job, device, progress)`` opens the ward at ``job.ward`` read-only, trains the job and writes its checkpoint
  folders into ``WARD/models/`` (temp folder, then rename), so the ward must be on a filesystem every node sees at the
  same path;
- the driver receives the finished jobs as they complete and registers them in the ledger: the ledger is written by
  the driver only, one job at a time;
- a worker that dies is restarted by Ray (``max_retries``), and so is a job that raised a transient error
  (:data:`TRANSIENT_ERRORS`); a job that still fails is reported as a :class:`DatawardError` naming it, after the other
  jobs have finished and been registered. The failed job's partial folders are removed; nothing of it is registered,
  so running ``train`` again resumes exactly what is missing.

Determinism does not depend on where a job runs (see :mod:`dataward.training.runner`): ``local`` and ``ray`` give
bitwise identical weights on the same kind of device.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from dataward.errors import DataChanged, DatawardError
from dataward.store.checkpoints import MODELS_DIR, folder_prefix
from dataward.training.planner import TrainJob

JobWork = Callable[[TrainJob, str, object], list[dict]]  # (job, device, progress or None) -> the job's stage records

# Errors a retry may cure (a shared filesystem hiccup, a busy ledger, another tenant's memory on the GPU). Anything else
# (a DatawardError, a shape error) fails the same way every time, so it is reported at once.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, sqlite3.OperationalError, torch.cuda.OutOfMemoryError)

# Fault injection for the failure tests (tests/test_executors.py), read by Ray workers only: DATAWARD_FAULT names a JSON
# file (read at each job start; absent file, no fault) holding a list of faults like
# {"job": "denoiser:1", "after_steps": 3, "action": "crash"|"raise", "once": "/path/marker"}: the job "denoiser:1" kills
# its worker (os._exit) or raises after 3 optimizer steps; with "once", only while the marker file does not exist yet.
FAULT_ENV = "DATAWARD_FAULT"


def job_name(job: TrainJob) -> str:
    """A job as users read it: ``denoiser of compartment 1``, ``router (all compartments)``."""
    kind, c = job.lineage.kind, job.lineage.compartment
    return f"{kind} (all compartments)" if c is None else f"{kind} of compartment {c}"


def _job_folders(job: TrainJob) -> set[str]:
    """The job's checkpoint folders (finished or ``.tmp-`` partial) under the ward's models/, any attempt."""
    models = Path(job.ward) / MODELS_DIR
    if not models.is_dir():
        return set()
    prefix = folder_prefix(job.lineage.kind, job.lineage.compartment)
    return {p.name for p in models.iterdir() if p.name.startswith(prefix) or p.name.startswith(f".tmp-{prefix}")}


def _remove_new_folders(job: TrainJob, before: set[str], keep: Iterable[str] = ()) -> list[str]:
    """Remove the job's folders that appeared since it was submitted, except ``keep`` (the results to register)."""
    removed = sorted(_job_folders(job) - before - set(keep))
    for name in removed:
        shutil.rmtree(Path(job.ward) / MODELS_DIR / name, ignore_errors=True)
    return removed


class _FaultProgress:
    """A stand-in progress display that injects the fault described by ``DATAWARD_FAULT`` (tests only)."""

    def __init__(self, fault: dict):
        self.fault, self.steps = fault, 0

    def add_task(self, description: str, total: int) -> int:
        return 0

    def update(self, task: int, advance: int = 1, **fields) -> None:
        self.steps += advance
        if self.steps < self.fault.get("after_steps", 1):
            return
        once = self.fault.get("once")
        if once:
            if Path(once).exists():
                return
            Path(once).touch()
        if self.fault.get("action", "crash") == "crash":
            os._exit(1)  # the worker dies mid-job, like a lost node or an OOM kill
        raise RuntimeError(f"injected fault after {self.steps} steps")


def _fault_progress(job: TrainJob):
    path = os.environ.get(FAULT_ENV)
    if not path or not Path(path).is_file():
        return None
    c = job.lineage.compartment
    name = f"{job.lineage.kind}:{'all' if c is None else c}"
    faults = [f for f in json.loads(Path(path).read_text()) if f.get("job") == name]
    return _FaultProgress(faults[0]) if faults else None


def _ray_task(work: JobWork, job: TrainJob, device: str) -> list[dict]:
    """The Ray task's body: ``work`` on the job (with the injected fault of the failure tests, if any)."""
    return work(job, device, _fault_progress(job))


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise DatawardError(f"--executor ray needs Ray, which is not installed ({error}): pip install 'dataward[ray]'") from None
    return ray


def _init_ray(ray, address: str | None) -> None:
    """Connect to ``address`` (a running cluster, or ``auto``), or start a local Ray; nothing if already connected."""
    if ray.is_initialized():
        return
    try:
        if address is None:
            ray.init(include_dashboard=False)
        else:
            ray.init(address=address)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {address!r}" if address else "a local Ray"
        raise DatawardError(f"cannot start or reach {where}: {error}") from None


def _describe(ray, error: BaseException) -> str:
    """One line about why a Ray task failed."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = getattr(error, "cause", None)
        if cause is not None:
            return f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    if isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return f"its worker died ({type(error).__name__})"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _connect(ray, address: str | None, cpus_per_job: float, gpus_per_job: float) -> None:
    """Connect to Ray and check that the cluster has the resources one job asks for."""
    _init_ray(ray, address)
    available = ray.cluster_resources()
    for resource, need in (("CPU", cpus_per_job), ("GPU", gpus_per_job)):
        if need and available.get(resource, 0) < need:
            raise DatawardError(f"each job asks for {need} {resource}(s) but the Ray cluster has {available.get(resource, 0)}: "
                                f"lower --{resource.lower()}s-per-job or add nodes")


def _submit(ray, jobs: list[TrainJob], work: JobWork, device: str, resources: dict) -> dict:
    """Start one Ray task per job; returns {task ref: the caller's job}."""
    task = ray.remote(_ray_task)
    pending = {}
    for job in jobs:
        # workers may run in another directory: send the ward's absolute path, yield the caller's job object
        remote_job = replace(job, ward=str(Path(job.ward).resolve()))
        pending[task.options(name=f"dataward {job_name(job)}", **resources).remote(work, remote_job, device)] = job
    return pending


def run_here(jobs: Iterable[TrainJob], work: JobWork, *, device: str = "cpu", progress=None) -> Iterator[tuple[TrainJob, list[dict]]]:
    """Run ``work`` on each job in this process, in order; yield ``(job, results)`` for the driver to register. A job
    that a forget interrupted (:class:`DataChanged`) yields the stages it finished, then the error is raised."""
    for job in jobs:
        try:
            results = work(job, device, progress)
        except DataChanged as changed:
            yield job, changed.results
            raise
        yield job, results


def run_on_ray(
    jobs: Iterable[TrainJob],
    work: JobWork,
    *,
    device: str = "cpu",
    ray_address: str | None = None,
    gpus_per_job: float = 0,
    cpus_per_job: float = 1,
    max_retries: int = 2,
    runtime_env: dict | None = None,
    progress=None,
) -> Iterator[tuple[TrainJob, list[dict]]]:
    """Run ``work`` on each job as one Ray task; yield ``(job, results)`` as each finishes, for the driver to register.

    ``gpus_per_job``/``cpus_per_job`` are the Ray resources each task asks for (fractions share a GPU);
    ``max_retries`` restarts a job whose worker died or that raised a :data:`TRANSIENT_ERRORS` error.
    ``runtime_env`` is passed to the tasks (e.g. ``{"env_vars": {...}}``). Raises :class:`DatawardError` naming every job
    that failed for good, after the others have finished and been yielded (:class:`DataChanged` if a forget stopped one).
    """
    ray, jobs = _import_ray(), list(jobs)
    if cpus_per_job <= 0 or gpus_per_job < 0 or max_retries < 0:
        raise DatawardError(f"need --cpus-per-job > 0, --gpus-per-job >= 0 and max_retries >= 0, got {cpus_per_job}, {gpus_per_job}, {max_retries}")
    if torch.device(device).type == "cuda" and gpus_per_job <= 0:
        raise DatawardError("--device cuda with --executor ray needs --gpus-per-job > 0: Ray gives each task its GPU(s)")
    if not jobs:
        return
    _connect(ray, ray_address, cpus_per_job, gpus_per_job)
    resources = dict(num_cpus=cpus_per_job, num_gpus=gpus_per_job, max_retries=max_retries, retry_exceptions=list(TRANSIENT_ERRORS),
                     runtime_env=runtime_env)
    shown = None if progress is None else progress.add_task(f"ray: {len(jobs)} job(s)", total=len(jobs))
    before = {id(job): _job_folders(job) for job in jobs}
    pending = _submit(ray, jobs, work, device, resources)
    failures, changed = [], []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                if progress is not None:
                    progress.update(shown, advance=1)
                try:
                    results = ray.get(ref)
                except Exception as error:  # noqa: BLE001 - every failure is reported, with its job
                    _remove_new_folders(job, before[id(job)])
                    if isinstance(getattr(error, "cause", error), DataChanged):  # a forget: the driver plans this job again
                        changed.append(str(getattr(error, "cause", error)))
                        continue
                    failures.append(f"{job_name(job)} (stages {job.start}..{len(job.lineage.stage_ids) - 1}): {_describe(ray, error)}")
                    continue
                _remove_new_folders(job, before[id(job)], keep=[r["folder"] for r in results])  # earlier attempts' leftovers
                yield job, results
    finally:
        for ref in pending:  # interrupted (Ctrl-C, or registering failed): stop the rest; the next open removes orphans
            ray.cancel(ref, force=True)
    if failures:
        raise DatawardError(f"{len(failures)} of {len(jobs)} training job(s) failed on Ray after up to {max_retries} retries: "
                            + "; ".join(failures) + ". Finished jobs are registered and the failed jobs' partial checkpoints "
                            "removed; run `dataward train` again to resume.")
    if changed:  # after the others were yielded: the driver registers them and plans again
        raise DataChanged("; ".join(changed))
