"""The generation pool: a bounded pool of workers (threads, or processes that each own their models; :mod:`~.workers`), admission
by count and by work (429 when the pool is full or the work ahead would keep a request waiting longer than the timeout),
and the loop that runs a generation, checks on the event loop that no model it used was tainted by a forget, and re-runs
it if one was.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import secrets
import time
from concurrent.futures import BrokenExecutor, Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Awaitable, Callable, Literal

from fastapi.responses import Response

from dataward.app.service import workers
from dataward.app.service.admission import RunTimes, Work, request_work
from dataward.app.service.api import ApiKey, GenerateRequest, ServiceError, ServiceLimits, shutting_down
from dataward.errors import DatawardError
from dataward.sampling.plan import sampling_weights
from dataward.ward import Ward

log = logging.getLogger("dataward.app.service")

WorkerKind = Literal["processes", "threads"]
ClientGone = Callable[[], Awaitable[None]]  # returns once the client that asked for a generation has disconnected


def check_limits(body: GenerateRequest, limits: ServiceLimits) -> None:
    """Server limits on a generation request (422 naming the field)."""
    if body.n > limits.max_n:
        raise ServiceError(422, f"n must be at most {limits.max_n} on this server, got {body.n}")
    if body.steps > limits.max_steps:
        raise ServiceError(422, f"steps must be at most {limits.max_steps} on this server, got {body.steps}")
    if body.grid and body.format != "png":
        raise ServiceError(422, "grid applies to format png only")


def choose_weights(body: GenerateRequest, key: ApiKey, ward: Ward) -> str:
    """The library's rule (:func:`dataward.sampling.plan.sampling_weights`: router weights only for a key that reaches every
    compartment, the router having seen them all; density when the ward's default is router) as 403s; 403 for a key with none."""
    if not key.allow:
        raise ServiceError(403, "this key may use no compartment, so it cannot generate (an admin key made with an empty "
                                "--allow may only forget); create a key with `--allow`")
    try:
        return sampling_weights(body.weights, ward.config.weights, sorted(key.allow), ward.compartments())
    except DatawardError as error:
        raise ServiceError(403, f"{error} (your key reaches {sorted(key.allow)})") from None


class GenerationPool:
    """``pool_size`` workers that generate, each with its own ward: processes (the default; throughput grows with them,
    since each has its own interpreter) or threads in the server's process (lighter; they share the GIL). Admitted: at
    most ``pool_size + queue_size`` generations, and, once run times were measured (:mod:`~.admission`), a request that
    would wait for a worker only while the work ahead of it is estimated to take at most the timeout. Admission counters
    and stop-flag slots are touched on the event loop only."""

    def __init__(self, path: Path, pool_size: int, queue_size: int, limits: ServiceLimits, torch_threads: int, kind: WorkerKind = "processes"):
        self.path = path
        self.pool_size = pool_size
        self.queue_size = queue_size
        self.limits = limits
        self.torch_threads = torch_threads
        self.kind = kind
        self.admitted = 0  # generations admitted and not finished
        self.admitted_seconds = 0.0  # their estimated run time (0 for those admitted before any run time was known)
        self.draining = False  # set at shutdown: no new generations (nor forgets)
        self.run_times = RunTimes()
        self._context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no inherited locks or threads
        self._flags = self._context.RawArray("b", self.capacity)  # stop flag per admitted generation, shared with workers
        self._free_slots = list(range(self.capacity))
        self._executor: Executor | None = None
        self._thread_wards: list[Ward] = []  # thread workers' wards, closed at shutdown

    @property
    def capacity(self) -> int:
        """Generations admitted at once: running plus queued."""
        return self.pool_size + self.queue_size

    def start(self) -> None:
        """Start the workers and wait until each has opened its ward (a worker that cannot start fails the start)."""
        self.draining = False
        self._executor = self._new_executor()
        try:
            for ready in [self._executor.submit(workers.worker_ready) for _ in range(self.pool_size)]:
                ready.result()
        except BrokenExecutor as error:
            self._executor.shutdown(wait=False, cancel_futures=True)
            raise DatawardError(f"the generation workers could not start ({error}); their error is logged above") from None

    def _new_executor(self) -> Executor:
        processes = self.kind == "processes"
        opened = None if processes else self._thread_wards  # a process worker's ward closes with its process
        server = os.getpid() if processes else None  # a process worker dies with this process (workers.die_with)
        setup = {"initializer": workers.start_worker, "initargs": (self.path, self.torch_threads, self._flags, opened, server)}
        if processes:
            return ProcessPoolExecutor(self.pool_size, mp_context=self._context, **setup)
        return ThreadPoolExecutor(self.pool_size, thread_name_prefix="dataward-generate", **setup)

    async def drain(self, deadline: float) -> None:
        """Refuse new work, let admitted generations finish until ``deadline`` (``time.monotonic``), then stop the rest
        at their next step, cancel queued ones and stop the workers."""
        self.draining = True
        while self.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        clean = self.admitted == 0
        if not clean:
            self._flags[:] = [1] * self.capacity
        self._executor.shutdown(wait=clean, cancel_futures=True)
        if clean:
            for ward in self._thread_wards:
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

    def admit(self, work: Work) -> tuple[float, int]:
        """Take a generation slot for ``work`` or refuse with 429 (503 while shutting down); returns its estimated seconds
        and its stop-flag slot (give both back to :meth:`release`)."""
        if self.draining:
            raise shutting_down("retry on another instance or later")
        if self.admitted >= self.capacity:
            raise self.busy()
        wait_s = self.wait_seconds()
        if wait_s > self.limits.generate_timeout_s:
            raise self.busy(f"the generations ahead of this one need about {wait_s:.0f} s, more than this server's "
                            f"{self.limits.generate_timeout_s:.0f} s")
        estimate = self.run_times.estimate(work) or 0.0
        self.admitted += 1
        self.admitted_seconds += estimate
        slot = self._free_slots.pop()
        self._flags[slot] = 0
        return estimate, slot

    def release(self, estimate: float, slot: int) -> None:
        """Give a slot back (event loop only)."""
        self.admitted -= 1
        self.admitted_seconds = max(0.0, self.admitted_seconds - estimate)
        self._free_slots.append(slot)

    # generation -----------------------------------------------------------------------------------------------------
    async def generate(self, body: GenerateRequest, key: ApiKey, checker: Ward, client_gone: ClientGone | None = None) -> Response:
        """Admit, run (re-running when a forget taints the models used), check with ``checker`` (the event loop's ward)
        and respond. Each run is stopped at its next step once it ran past the timeout or the client went away (when
        ``client_gone`` returns, or the request is cancelled)."""
        check_limits(body, self.limits)
        weights = choose_weights(body, key, checker)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        work = request_work(body, key, weights)
        estimate, slot = self.admit(work)
        future: asyncio.Future | None = None
        try:
            for attempt in range(1, self.limits.max_attempts + 1):
                executor = self._executor
                future = asyncio.wrap_future(self._submit(executor, body, key, seed, weights, slot))
                result = await self._wait(future, executor, slot, client_gone)
                # From here to the return: no await, so no forget's 202 can be returned in between (see the package doc).
                tainted = checker.ledger.tainted_models(list(result.used))
                if tainted or (result.error is not None and checker.ledger.forget_count() != result.epoch):
                    log.info("generation attempt %d used model(s) %s tainted by a forget; re-running", attempt, tainted)
                    continue
                if result.error is not None:
                    if result.error.status == 503:
                        result.error.headers.setdefault("Retry-After", self.retry_after())
                    raise result.error
                self.run_times.add(work, result.seconds)
                return Response(result.body, media_type="application/json", headers={"X-Dataward-Attempts": str(attempt)})
            raise ServiceError(503, "forget requests kept changing the models during this generation; retry",
                               {"Retry-After": self.retry_after()})
        finally:
            if future is not None and not future.done():
                future.add_done_callback(lambda _: self.release(estimate, slot))  # the worker stops at its next step; its slot frees then
            else:
                self.release(estimate, slot)

    def _submit(self, executor: Executor, body: GenerateRequest, key: ApiKey, seed: int, weights: str, slot: int):
        """Hand one attempt to a worker; a pool whose process died is replaced (this request gets 503, later ones run)."""
        try:
            return executor.submit(workers.run_attempt, body, key, seed, weights, self.limits.generate_timeout_s, slot)
        except BrokenExecutor:
            raise self._replace_broken(executor) from None

    def _replace_broken(self, executor: Executor) -> ServiceError:
        """Start a new pool in place of ``executor`` (once, however many requests saw it broken); the 503 to answer."""
        if executor is self._executor:
            log.error("a generation worker stopped (killed, or out of memory); starting new workers")
            executor.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new_executor()
        return ServiceError(503, "a generation worker stopped during this generation; new workers were started: retry",
                            {"Retry-After": "5"})

    async def _wait(self, future: asyncio.Future, executor: Executor, slot: int, client_gone: ClientGone | None) -> workers.Attempt:
        """The attempt of ``future``; if the client disconnects or this request is cancelled (shutdown), the run is
        stopped at its next step (its slot frees when it has stopped: see :meth:`generate`)."""
        watcher = None if client_gone is None else asyncio.ensure_future(client_gone())
        try:
            if watcher is not None:
                await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not future.done():
                    self._flags[slot] = 1
                    log.info("a client disconnected during its generation; stopping it at its next step")
                    raise ServiceError(499, "the client disconnected; the generation was stopped")
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._flags[slot] = 1
            task = asyncio.current_task()
            if future.cancelled() and not (task and task.cancelling()):  # the pool refused queued work at shutdown
                raise shutting_down("retry later") from None
            raise
        except BrokenExecutor:
            raise self._replace_broken(executor) from None
        finally:
            if watcher is not None:
                watcher.cancel()
