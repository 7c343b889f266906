"""Generation: a bounded pool of threads (one :class:`Ward` each), admission by count and by work (429 when the pool is full
or the work ahead would keep a request waiting longer than the timeout), the clock that stops a generation running past the timeout, and the loop
that runs a generation, checks on the event loop that no model it used was tainted by a forget, and re-runs it if one was.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi.responses import Response

from dataward.app.service.admission import RunTimes, Work, request_work
from dataward.app.service.render import render_result
from dataward.app.service.schema import ApiKey, GenerateRequest, ServiceError, ServiceLimits, client_message, shutting_down
from dataward.errors import DatawardError
from dataward.store.ledger import ModelRecord
from dataward.ward import Ward, WardHooks

log = logging.getLogger("dataward.app.service")


@dataclass
class Attempt:
    """One generation run in the pool: the rendered body, or a problem; the models it loaded; the forget count at start."""

    body: bytes | None
    used: set[int]
    epoch: int
    error: ServiceError | None = None
    seconds: float | None = None  # run time of a generation that finished


class GenerationStopped(Exception):
    """Raised inside a pool thread at the step after a :class:`RunClock` ran out or was stopped."""


class RunClock:
    """Handed to :meth:`Ward.sample` as its progress display: the generation ends at the next sampling step once it has
    run ``timeout_s`` (counted from :meth:`start`, not from admission) or once :meth:`stop` was called (client gone)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.deadline = math.inf
        self.stopped = threading.Event()

    def start(self) -> None:
        """The attempt begins running in a pool thread."""
        self.deadline = time.monotonic() + self.timeout_s

    def stop(self) -> None:
        """End the generation at its next step (from any thread)."""
        self.stopped.set()

    def add_task(self, description: str, total: int) -> int:
        return 0

    def update(self, task: int, advance: int = 1, **fields) -> None:
        if self.stopped.is_set() or time.monotonic() > self.deadline:
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


def check_limits(body: GenerateRequest, limits: ServiceLimits) -> None:
    """Server limits on a generation request (422 naming the field)."""
    if body.n > limits.max_n:
        raise ServiceError(422, f"n must be at most {limits.max_n} on this server, got {body.n}")
    if body.steps > limits.max_steps:
        raise ServiceError(422, f"steps must be at most {limits.max_steps} on this server, got {body.steps}")
    if body.grid and body.format != "png":
        raise ServiceError(422, "grid applies to format png only")


def choose_weights(body: GenerateRequest, key: ApiKey, ward: Ward) -> str:
    """Density weights unless the key reaches every compartment (the router saw them all); 403 for a key with none."""
    if not key.allow:
        raise ServiceError(403, "this key may use no compartment, so it cannot generate (an admin key made with an empty "
                                "--allow may only forget); create a key with `--allow`")
    everything = set(key.allow) >= set(ward.compartments())
    weights = body.weights or ward.config.weights
    if weights == "router" and not everything:
        if body.weights == "router":
            raise ServiceError(403, "weights=router is only for keys that reach every compartment: the router was trained on every "
                                    f"compartment's data, and your key reaches {list(key.allow)}; use weights=density")
        return "density"
    return weights


class GenerationPool:
    """``pool_size`` threads that generate, each with its own ward. Admitted: at most ``pool_size + queue_size``
    generations, and, once run times were measured (:mod:`~dataward.app.service.admission`), a request that would wait
    for a worker only while the work ahead of it is estimated to take at most the timeout. Admission counters are
    touched on the event loop only."""

    def __init__(self, path: Path, pool_size: int, queue_size: int, limits: ServiceLimits, torch_threads: int):
        self.path = path
        self.pool_size = pool_size
        self.queue_size = queue_size
        self.limits = limits
        self.torch_threads = torch_threads
        self.admitted = 0  # generations admitted and not finished
        self.admitted_seconds = 0.0  # their estimated run time (0 for those admitted before any run time was known)
        self.draining = False  # set at shutdown: no new generations (nor forgets)
        self.run_times = RunTimes()
        self._executor: ThreadPoolExecutor | None = None
        self._local = threading.local()  # per pool thread: its ward and usage recorder
        self._wards: list[Ward] = []
        self._wards_lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """Generations admitted at once: running plus queued."""
        return self.pool_size + self.queue_size

    def start(self) -> None:
        """Start the threads (each opens its ward when it starts)."""
        self.draining = False
        self._executor = ThreadPoolExecutor(self.pool_size, thread_name_prefix="dataward-generate", initializer=self._init_thread)

    def _init_thread(self) -> None:
        torch.set_num_threads(self.torch_threads)  # per thread: a new thread does not inherit the count (OpenMP)
        recorder = UsageRecorder()
        ward = Ward.open(self.path, worker=True, hooks=WardHooks(on_load=recorder))
        self._local.ward, self._local.recorder = ward, recorder
        with self._wards_lock:
            self._wards.append(ward)

    async def drain(self, deadline: float) -> None:
        """Refuse new work, let admitted generations finish until ``deadline`` (``time.monotonic``), cancel queued ones
        and stop the threads; their wards are closed when every generation finished."""
        self.draining = True
        while self.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        clean = self.admitted == 0
        self._executor.shutdown(wait=clean, cancel_futures=True)
        if clean:
            for ward in self._wards:
                ward.close()

    # admission ------------------------------------------------------------------------------------------------------
    def wait_seconds(self) -> float:
        """Estimated seconds until a worker is free for one more generation."""
        return 0.0 if self.admitted < self.pool_size else self.admitted_seconds / self.pool_size

    def retry_after(self) -> str:
        """Seconds until a slot is likely free."""
        return str(max(1, math.ceil(self.wait_seconds())))

    def busy(self, reason: str | None = None) -> ServiceError:
        """The 429 of a full pool."""
        reason = reason or f"{self.admitted} generations running or queued (capacity {self.capacity})"
        return ServiceError(429, f"busy: {reason}; retry later", {"Retry-After": self.retry_after()})

    def admit(self, work: Work) -> float:
        """Take a generation slot for ``work`` or refuse with 429 (503 while shutting down); returns its estimated seconds
        (give them back to :meth:`release`)."""
        if self.draining:
            raise shutting_down("retry on another instance or later")
        if self.admitted >= self.capacity:
            raise self.busy()
        wait = self.wait_seconds()
        if wait > self.limits.generate_timeout_s:
            raise self.busy(f"the generations ahead of this one need about {wait:.0f} s, more than this server's "
                            f"{self.limits.generate_timeout_s:.0f} s")
        estimate = self.run_times.estimate(work) or 0.0
        self.admitted += 1
        self.admitted_seconds += estimate
        return estimate

    def release(self, estimate: float) -> None:
        """Give a slot back (event loop only)."""
        self.admitted -= 1
        self.admitted_seconds = max(0.0, self.admitted_seconds - estimate)

    # generation -----------------------------------------------------------------------------------------------------
    def run_once(self, body: GenerateRequest, key: ApiKey, seed: int, weights: str, clock: RunClock) -> Attempt:
        """Run in a pool thread: sample over the key's compartments and render the response body; stopped by ``clock``."""
        clock.start()
        ward: Ward = self._local.ward
        recorder: UsageRecorder = self._local.recorder
        if torch.get_num_threads() != self.torch_threads:  # retraining sets its own count
            torch.set_num_threads(self.torch_threads)
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
            return Attempt(None, set(recorder.used), epoch, ServiceError(400, client_message(error, self.path)))
        except GenerationStopped:
            if clock.stopped.is_set():
                return Attempt(None, set(recorder.used), epoch, shutting_down("the generation was stopped"))
            return Attempt(None, set(recorder.used), epoch, ServiceError(
                503, f"generation ran past {self.limits.generate_timeout_s:.0f} s and was stopped; retry with fewer images or steps",
                {"Retry-After": self.retry_after()}))
        rendered = render_result(result, body, key, seed, ward.compartments())
        return Attempt(rendered, set(recorder.used), epoch, seconds=time.monotonic() - started)

    async def generate(self, body: GenerateRequest, key: ApiKey, checker: Ward) -> Response:
        """Admit, run (re-running when a forget taints the models used), check with ``checker`` (the event loop's ward)
        and respond. Each run is stopped at its next step once it ran past the timeout or the client went away."""
        check_limits(body, self.limits)
        weights = choose_weights(body, key, checker)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        work = request_work(body, key, weights)
        estimate = self.admit(work)
        clock = RunClock(self.limits.generate_timeout_s)
        future: asyncio.Future | None = None
        try:
            for attempt in range(1, self.limits.max_attempts + 1):
                future = asyncio.get_running_loop().run_in_executor(self._executor, self.run_once, body, key, seed, weights, clock)
                result = await self._wait(future, clock)
                # From here to the return: no await, so no forget's 202 can be returned in between (see the package doc).
                tainted = checker.ledger.tainted_models(list(result.used))
                if tainted or (result.error is not None and checker.ledger.forget_count() != result.epoch):
                    log.info("generation attempt %d used model(s) %s tainted by a forget; re-running", attempt, tainted)
                    continue
                if result.error is not None:
                    raise result.error
                self.run_times.add(work, result.seconds)
                return Response(result.body, media_type="application/json", headers={"X-Dataward-Attempts": str(attempt)})
            raise ServiceError(503, "forget requests kept changing the models during this generation; retry",
                               {"Retry-After": self.retry_after()})
        finally:
            if future is not None and not future.done():
                future.add_done_callback(lambda _: self.release(estimate))  # the thread stops at its next step; its slot frees then
            else:
                self.release(estimate)

    @staticmethod
    async def _wait(future: asyncio.Future, clock: RunClock) -> Attempt:
        """The attempt of ``future``; if this request is cancelled (client gone, shutdown), the run is stopped."""
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            clock.stop()
            task = asyncio.current_task()
            if future.cancelled() and not (task and task.cancelling()):  # the pool refused queued work at shutdown
                raise shutting_down("retry later") from None
            raise
