"""Generation workers: what runs in a pool worker (a thread, or a process of its own), and the clock that stops it.

A worker opens its own :class:`Ward` once (:func:`start_worker`) and runs :func:`run_attempt` for each generation: it
reads which models serve from the ledger on every call, so a forget or a retrained model reaches every worker on its
next generation. What crosses between the event loop and a worker is plain data (the request, the key's record, a seed,
the rendered bytes and the IDs of the models used); process workers get it through :mod:`concurrent.futures` over
private pipes to the server's own processes, never from a file or the network.

A generation is stopped at its next sampling step by its :class:`RunClock`: once it has run the timeout (counted from
when a worker picks it up) or once its slot's stop flag is set by the event loop (the client went away, shutdown). The
flags live in shared memory (one byte per admitted generation), so they reach process workers too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dataward.app.service.render import render_result
from dataward.app.service.api import ApiKey, GenerateRequest, ServiceError, client_message, shutting_down
from dataward.errors import DatawardError
from dataward.store.ledger import ModelRecord
from dataward.ward import Ward, WardHooks

log = logging.getLogger("dataward.app.service")
PR_SET_PDEATHSIG = 1  # Linux prctl option: the signal a process gets when its parent ends


@dataclass
class Attempt:
    """One generation run by a worker: the rendered body, or a problem; the models it loaded; the forget count at start."""

    body: bytes | None
    used: set[int]
    epoch: int
    error: ServiceError | None = None
    seconds: float | None = None  # run time of a generation that finished


class GenerationStopped(Exception):
    """Raised inside a worker at the step after a :class:`RunClock` ran out or its stop flag was set."""


class RunClock:
    """Handed to :meth:`Ward.sample` as its progress display: the generation ends at the next sampling step once it has
    run ``timeout_s`` (from when the worker made the clock, i.e. picked the generation up) or once ``flags[slot]`` is set."""

    def __init__(self, timeout_s: float, flags, slot: int):
        self.flags = flags
        self.slot = slot
        self.deadline = time.monotonic() + timeout_s

    @property
    def stopped(self) -> bool:
        """Whether the event loop asked this generation to stop."""
        return bool(self.flags[self.slot])

    def add_task(self, description: str, total: int) -> int:
        return 0

    def update(self, task: int, advance: int = 1, **fields) -> None:
        if self.stopped or time.monotonic() > self.deadline:
            raise GenerationStopped


class UsageRecorder:
    """``WardHooks.on_load`` of a generation ward: the IDs of the models it used since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.used: set[int] = set()

    def __call__(self, record: ModelRecord) -> None:
        self.used.add(record.id)

    def reset(self) -> None:
        """Start recording a new attempt."""
        self.used = set()


_worker = threading.local()  # per worker thread (one per process for process workers): its ward, recorder and flags


def start_worker(path: Path, torch_threads: int, flags, opened: list[Ward] | None, server: int | None = None) -> None:
    """Pool initializer: the torch thread count (per thread: OpenMP threads do not inherit it) and the worker's ward
    (added to ``opened`` for thread workers, whose pool closes them); a process worker dies with its ``server`` process."""
    if server is not None:
        die_with(server)
    torch.set_num_threads(torch_threads)
    recorder = UsageRecorder()
    _worker.ward = Ward.open(path, worker=True, hooks=WardHooks(on_load=recorder))
    if opened is not None:
        opened.append(_worker.ward)  # list.append is atomic: threads start concurrently
    _worker.recorder, _worker.flags, _worker.torch_threads = recorder, flags, torch_threads


def die_with(server: int) -> None:
    """End this worker process when the server process ``server`` (its parent) ends, even by SIGKILL, so that no worker,
    nor the multiprocessing resource tracker whose pipe the workers keep open, outlives a crashed server: Linux's
    parent-death signal (prctl PR_SET_PDEATHSIG), else a thread that checks the parent every second."""
    if sys.platform.startswith("linux"):
        armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0
        if os.getppid() != server:  # the server died before the signal was armed
            os._exit(1)
        if armed:
            return
    threading.Thread(target=_exit_when_orphaned, args=(server,), name="dataward-server-watch", daemon=True).start()


def _exit_when_orphaned(server: int) -> None:
    while os.getppid() == server:
        time.sleep(1.0)
    os._exit(1)


def worker_ready() -> bool:
    """Run once per worker at start, so that workers open their wards before the first request."""
    return True


def run_attempt(body: GenerateRequest, key: ApiKey, seed: int, weights: str, timeout_s: float, slot: int) -> Attempt:
    """Run in a worker: sample over the key's compartments and render the response body; stopped by the slot's clock."""
    clock = RunClock(timeout_s, _worker.flags, slot)
    ward: Ward = _worker.ward
    recorder: UsageRecorder = _worker.recorder
    if torch.get_num_threads() != _worker.torch_threads:  # retraining (in the server's process) sets its own count
        torch.set_num_threads(_worker.torch_threads)
    epoch = ward.ledger.forget_count()
    ward.drop_unready_models()
    recorder.reset()
    started = time.monotonic()
    served = ward.served()
    if not any(c in served for c in key.allow):
        reason = "retraining after a forget" if ward.ledger.pending_forgets() else "the ward is not trained"
        return Attempt(None, set(), epoch, ServiceError(503, f"no model serves your compartments {list(key.allow)} right now ({reason})",
                                                        {"Retry-After": "5"}))
    try:
        result = ward.sample(body.n, label=body.label, seed=seed, sampler=body.sampler, steps=body.steps, allowed=list(key.allow),
                             weights=weights, top_k=body.top_k, guard=body.guard, progress=clock)
    except DatawardError as error:
        return Attempt(None, set(recorder.used), epoch, ServiceError(400, client_message(error, ward.path)))
    except GenerationStopped:
        if clock.stopped:
            return Attempt(None, set(recorder.used), epoch, shutting_down("the generation was stopped"))
        return Attempt(None, set(recorder.used), epoch, ServiceError(
            503, f"generation ran past {timeout_s:.0f} s and was stopped; retry with fewer images or steps"))
    rendered = render_result(result, body, key, seed, ward.compartments())
    return Attempt(rendered, set(recorder.used), epoch, seconds=time.monotonic() - started)
