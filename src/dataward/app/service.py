"""The HTTP service: a ward behind an API, one key per customer, each key reaching only its compartments.

``create_app(ward_path)`` returns a FastAPI app (``dataward serve`` runs it under uvicorn). See docs/service.md.

Design, in short:

- **Auth.** Every endpoint but ``/healthz`` (and the OpenAPI schema) needs a key (``Authorization: Bearer KEY`` or
  ``X-API-Key: KEY``). The SHA-256 of the presented key is looked up in the ledger on *every* request and compared with
  :func:`hmac.compare_digest`, so revoking a key takes effect on the very next request.
- **Grants.** Generation composes over the key's compartments only (``Ward.sample(..., allowed=key.allow)``); nothing in
  a request can widen that (unknown body fields are refused). The joint router saw every compartment's data, so it is
  used only for keys that reach every compartment; other keys get compartment-pure density weights.
- **Threads.** Sampling (CPU-bound torch) runs in a bounded pool; each pool thread has its own :class:`Ward` (its own
  SQLite connection and model cache). At most ``pool_size + queue_size`` generations are admitted; the rest get 429 with
  Retry-After. Forget acceptance runs on its own thread with its own Ward, retraining on another (one at a time).
  The event loop has a Ward of its own for key checks and the final forget check (short indexed reads; WAL readers
  never wait for writers).
- **Forgetting during generation.** Each generation records every model it loads (denoisers, router, guards). Its
  response is released by the event loop only after a check, *on the event loop, with no await between the check and
  the return*, that none of those models is quarantined/deleted or saw a forgotten ID. The forget's 202 is also returned
  on the event loop, after its ledger transaction committed. So a generation response returned after the 202 ran its
  check after the commit and saw it; if a model it used is tainted, it is re-run (on the models now served) and, after
  ``max_attempts``, answered 503 with Retry-After. Retraining registers a model only under the same lock as forget
  acceptance and only if none of its IDs was forgotten meanwhile, so no tainted model is ever marked ready.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import math
import secrets
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException

import dataward
from dataward.errors import DatawardError
from dataward.store.ledger import Ledger, ModelRecord
from dataward.ward import SampleResult, TrainJob, Ward

log = logging.getLogger("dataward.app.service")


# configuration -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for. Exceeding a limit is a 4xx naming the field, never a 5xx."""

    max_n: int = 64  # images per generation request
    max_steps: int = 250  # sampling steps per request
    max_body_bytes: int = 64 * 1024  # request body size (413 above it)
    max_forget_ids: int = 10_000  # sample IDs per forget request
    generate_timeout_s: float = 120.0  # a generation still running after this answers 503 (its slot frees when it ends)
    max_attempts: int = 3  # runs of one generation when forgets keep tainting its models (then 503)
    shutdown_timeout_s: float = 30.0  # how long shutdown waits for admitted generations and retraining


class ServiceError(Exception):
    """An HTTP answer with a message (and headers), raised inside the service and rendered by one handler."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# request bodies ------------------------------------------------------------------------------------------------------
class GenerateRequest(BaseModel):
    """POST /v1/generate. Unknown fields are refused (422): the grant comes from the key, never from the body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    n: int = Field(1, ge=1, description="Number of images (at most the server's max_n).")
    label: int | None = Field(None, ge=0, description="Class label for every image (random by default).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Sampling seed (random by default; echoed back).")
    guard: bool = Field(False, description="Steer away from training data with each compartment's CPSample guard.")
    sampler: Literal["ddpm", "ddim"] | None = Field(None, description="ddpm (needed by density weights) or ddim.")
    steps: int = Field(50, ge=1, description="Sampling steps (at most the server's max_steps).")
    weights: Literal["router", "density"] | None = Field(None, description="Composition weights; router only for keys reaching every compartment.")
    top_k: int | None = Field(None, ge=1, description="Evaluate only the k heaviest compartments per sample and step.")
    format: Literal["png", "npz"] = Field("png", description="png: base64 PNGs; npz: one base64 .npz (images, labels, attribution).")
    grid: bool = Field(False, description="With png: one grid image instead of one PNG per sample.")


SampleId = Annotated[str, StringConstraints(min_length=1, max_length=512)]


class ForgetBody(BaseModel):
    """POST /v1/forget (admin keys)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ids: list[SampleId] = Field(..., min_length=1, description="Sample IDs to forget, e.g. digits:0042.")


@dataclass(frozen=True)
class ApiKey:
    """The authenticated caller: a key record from the ledger (never the key itself)."""

    id: int
    name: str
    allow: tuple[int, ...]
    admin: bool


# the ward, as the service uses it ------------------------------------------------------------------------------------
class _StaleTraining(DatawardError):
    """A retraining finished on IDs that were forgotten meanwhile; its models were not registered (retrain again)."""


class ServingWard(Ward):
    """A :class:`Ward` that records every model it loads (for the forget check) and refuses, under ``register_lock``,
    to register a trained model that saw an ID forgotten while it trained."""

    register_lock: threading.Lock | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.used: set[int] = set()  # model IDs loaded since the last reset (one generation attempt)

    def _load(self, record: ModelRecord) -> torch.nn.Module:
        self.used.add(record.id)
        return super()._load(record)

    def register(self, job: TrainJob, results: list[dict]) -> None:
        """Register a job's checkpoints unless one of their IDs was forgotten meanwhile (then delete them, retry later)."""
        lock = self.register_lock or threading.Lock()
        with lock:
            ids = sorted({i for r in results for i in r["ids"]})
            rows = self.ledger.sample_rows(ids)
            if any(i not in rows or rows[i][2] is not None for i in ids):
                for r in results:
                    shutil.rmtree(self.path / "models" / r["folder"], ignore_errors=True)
                raise _StaleTraining("IDs were forgotten while training; retraining")
            super().register(job, results)

    def prune_cache(self) -> None:
        """Drop cached models that are no longer ready (quarantined, deleted or retired)."""
        if not self._loaded:
            return
        ids = sorted(self._loaded)
        ready = {r[0] for r in self.ledger.db.execute(
            f"SELECT id FROM models WHERE id IN ({','.join('?' * len(ids))}) AND status='ready'", ids)}
        for model_id in ids:
            if model_id not in ready:
                self._loaded.pop(model_id, None)


def tainted_models(ledger: Ledger, model_ids: set[int]) -> list[int]:
    """Of ``model_ids``: those no longer servable after a forget (quarantined/deleted) or that saw a forgotten ID."""
    if not model_ids:
        return []
    ids = sorted(model_ids)
    marks = ",".join("?" * len(ids))
    bad = {r[0] for r in ledger.db.execute(f"SELECT id FROM models WHERE id IN ({marks}) AND status NOT IN ('ready', 'retired')", ids)}
    bad |= {r[0] for r in ledger.db.execute(
        f"SELECT DISTINCT ms.model_id FROM samples s JOIN model_samples ms ON ms.sample_id = s.id "
        f"WHERE s.forgotten_at IS NOT NULL AND ms.model_id IN ({marks})", ids)}
    return sorted(bad)


def forget_epoch(ledger: Ledger) -> int:
    """How many forget requests the ledger has accepted (changes exactly when a forget takes effect)."""
    return ledger.db.execute("SELECT COUNT(*) FROM forget_requests").fetchone()[0]


# background retraining -----------------------------------------------------------------------------------------------
class Retrainer:
    """One thread that runs ``ward.train()`` whenever asked (after a forget), one training at a time, with backoff."""

    def __init__(self, ward: ServingWard, torch_threads: int):
        self.ward = ward
        self.torch_threads = torch_threads
        self.running = False
        self.last_error: str | None = None
        self.last_seconds: float | None = None
        self.lock = threading.Lock()  # serializes trainings
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dataward-retrain", daemon=True)

    def start(self) -> None:
        """Start the thread (and retrain at once if a forget from an earlier run is still pending)."""
        self._thread.start()
        if self.ward.ledger.pending_forgets():
            self.request()

    def request(self) -> None:
        """Ask for a training run (coalesced with one already asked for)."""
        self._wanted.set()

    def stop(self, timeout: float) -> bool:
        """Stop after the current training; True when the thread ended within ``timeout``."""
        self._stop.set()
        self._wanted.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            started = time.time()
            try:
                with self.lock:
                    self.running = True
                    self.ward.train()
                self.last_error, delay = None, 0.0
                self.last_seconds = time.time() - started
                if self.ward.ledger.pending_forgets() and self.ward.models_missing():
                    delay = 1.0  # a forget landed during the run: go again
                    self._wanted.set()
            except DatawardError as error:  # data changed under the training (a forget): go again at once
                log.info("retraining restarts: %s", error)
                self._wanted.set()
                delay = 0.05
            except Exception as error:  # noqa: BLE001 - keep serving; the ledger keeps the forget pending
                log.exception("retraining failed")
                self.last_error = f"{type(error).__name__}: {error}"
                delay = min(30.0, max(1.0, 2 * delay))
                self._wanted.set()
            finally:
                self.running = False
                torch.set_num_threads(self.torch_threads)  # training sets its own thread count
            if delay:
                self._stop.wait(delay)


# the service ---------------------------------------------------------------------------------------------------------
@dataclass
class _Attempt:
    """One generation run in the pool: the rendered body, or a problem; the models it loaded; the forget epoch at start."""

    body: bytes | None
    used: set[int]
    epoch: int
    error: ServiceError | None = None


@dataclass
class Service:
    """Everything the app holds: the wards, the pool, admission counters, the retrainer."""

    path: Path
    pool_size: int
    queue_size: int
    limits: ServiceLimits
    torch_threads: int
    api: ServingWard | None = None  # event-loop thread only
    admin: ServingWard | None = None  # forget-acceptance thread only
    pool: ThreadPoolExecutor | None = None
    admin_pool: ThreadPoolExecutor | None = None
    retrainer: Retrainer | None = None
    register_lock: threading.Lock = field(default_factory=threading.Lock)
    admitted: int = 0  # generations admitted and not finished (event loop only)
    draining: bool = False
    mean_seconds: float = 1.0  # moving average of a generation's run time (for Retry-After)
    _local: threading.local = field(default_factory=threading.local)
    _worker_wards: list[ServingWard] = field(default_factory=list)
    _wards_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def capacity(self) -> int:
        """Generations admitted at once: running plus queued."""
        return self.pool_size + self.queue_size

    # lifecycle ------------------------------------------------------------------------------------------------------
    def _open(self, worker: bool = True) -> ServingWard:
        ward = ServingWard.open(self.path, worker=worker)
        ward.register_lock = self.register_lock
        return ward

    def start(self) -> None:
        """Open the wards (the first one, non-worker, cleans up after a crash), start the pools and the retrainer."""
        torch.set_num_threads(self.torch_threads)
        trainer_ward = self._open(worker=False)
        self.api = self._open()
        self.admin = self._open()
        self.pool = ThreadPoolExecutor(self.pool_size, thread_name_prefix="dataward-generate", initializer=self._init_worker)
        self.admin_pool = ThreadPoolExecutor(1, thread_name_prefix="dataward-forget")
        self.retrainer = Retrainer(trainer_ward, self.torch_threads)
        self.retrainer.start()
        self.draining = False

    def _init_worker(self) -> None:
        torch.set_num_threads(self.torch_threads)  # per thread: a new thread does not inherit the count (OpenMP)
        ward = self._open()
        self._local.ward = ward
        with self._wards_lock:
            self._worker_wards.append(ward)

    async def stop(self) -> None:
        """Refuse new work, let admitted generations finish (up to the timeout), stop retraining, close the wards."""
        self.draining = True
        deadline = time.monotonic() + self.limits.shutdown_timeout_s
        while self.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        clean = self.admitted == 0
        self.pool.shutdown(wait=clean, cancel_futures=True)
        self.admin_pool.shutdown(wait=True)
        remaining = max(0.0, deadline - time.monotonic())
        trained = await asyncio.to_thread(self.retrainer.stop, remaining)
        if not trained:
            log.warning("retraining still running at shutdown; the ledger keeps the forget pending and the next start resumes it")
        closeable = [self.api, self.admin] + (self._worker_wards if clean else []) + ([self.retrainer.ward] if trained else [])
        for ward in closeable:
            ward.close()

    # admission ------------------------------------------------------------------------------------------------------
    def retry_after(self) -> str:
        """Seconds until a slot is likely free."""
        return str(max(1, math.ceil(self.mean_seconds * max(1, self.admitted) / self.pool_size)))

    def admit(self) -> None:
        """Take a generation slot or refuse with 429 (503 while shutting down)."""
        if self.draining:
            raise ServiceError(503, "the server is shutting down: retry on another instance or later", {"Retry-After": "5"})
        if self.admitted >= self.capacity:
            raise ServiceError(429, f"busy: {self.admitted} generations running or queued (capacity {self.capacity}); retry later",
                               {"Retry-After": self.retry_after()})
        self.admitted += 1

    def release(self, *_: Any) -> None:
        """Give a slot back (event loop only)."""
        self.admitted -= 1

    # generation -----------------------------------------------------------------------------------------------------
    def generation_job(self, body: GenerateRequest, key: ApiKey, seed: int, weights: str | None) -> _Attempt:
        """Run in a pool thread: sample over the key's compartments and render the response body."""
        ward: ServingWard = self._local.ward
        if torch.get_num_threads() != self.torch_threads:  # retraining sets its own count
            torch.set_num_threads(self.torch_threads)
        epoch = forget_epoch(ward.ledger)
        ward.prune_cache()
        ward.used = set()
        started = time.time()
        served = ward.served()
        if not any(c in served for c in key.allow):
            pending = bool(ward.ledger.pending_forgets())
            reason = "retraining after a forget" if pending else "the ward is not trained"
            return _Attempt(None, set(), epoch, ServiceError(503, f"no model serves your compartments {list(key.allow)} right now ({reason})",
                                                             {"Retry-After": "5"}))
        try:
            result = ward.sample(body.n, label=body.label, seed=seed, sampler=body.sampler, steps=body.steps, allowed=list(key.allow),
                                 weights=weights, top_k=body.top_k, guard=body.guard)
        except DatawardError as error:
            return _Attempt(None, set(ward.used), epoch, ServiceError(400, str(error)))
        rendered = render_result(result, body, key, seed, ward.compartments())
        self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.time() - started)
        return _Attempt(rendered, set(ward.used), epoch)

    async def generate(self, body: GenerateRequest, key: ApiKey) -> Response:
        """Admit, run (re-running when a forget taints the models used), check on the event loop, respond."""
        self.check_generate(body)
        weights = self.choose_weights(body, key)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        self.admit()
        loop = asyncio.get_running_loop()
        future: asyncio.Future | None = None
        deadline = time.monotonic() + self.limits.generate_timeout_s
        try:
            for attempt in range(1, self.limits.max_attempts + 1):
                future = loop.run_in_executor(self.pool, self.generation_job, body, key, seed, weights)
                remaining = deadline - time.monotonic()
                try:
                    result: _Attempt = await asyncio.wait_for(asyncio.shield(future), max(0.001, remaining))
                except asyncio.TimeoutError:
                    raise ServiceError(503, f"generation took longer than {self.limits.generate_timeout_s:.0f} s; retry with fewer images or steps",
                                       {"Retry-After": self.retry_after()}) from None
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if future.cancelled() and not (task and task.cancelling()):  # the pool refused queued work at shutdown
                        raise ServiceError(503, "the server is shutting down: retry later", {"Retry-After": "5"}) from None
                    raise
                # From here to the return: no await, so no forget's 202 can be returned in between (see the module doc).
                tainted = tainted_models(self.api.ledger, result.used)
                if tainted or (result.error is not None and forget_epoch(self.api.ledger) != result.epoch):
                    log.info("generation attempt %d used model(s) %s tainted by a forget; re-running", attempt, tainted)
                    continue
                if result.error is not None:
                    raise result.error
                return Response(result.body, media_type="application/json", headers={"X-Dataward-Attempts": str(attempt)})
            raise ServiceError(503, "forget requests kept changing the models during this generation; retry",
                               {"Retry-After": self.retry_after()})
        finally:
            if future is not None and not future.done():
                future.add_done_callback(self.release)  # the thread still runs: its slot frees when it ends
            else:
                self.release()

    def check_generate(self, body: GenerateRequest) -> None:
        """Server limits on a generation request (422 naming the field)."""
        if body.n > self.limits.max_n:
            raise ServiceError(422, f"n must be at most {self.limits.max_n} on this server, got {body.n}")
        if body.steps > self.limits.max_steps:
            raise ServiceError(422, f"steps must be at most {self.limits.max_steps} on this server, got {body.steps}")
        if body.grid and body.format != "png":
            raise ServiceError(422, "grid applies to format png only")

    def choose_weights(self, body: GenerateRequest, key: ApiKey) -> str:
        """Density weights unless the key reaches every compartment (the router saw them all)."""
        everything = set(key.allow) >= set(self.api.compartments())
        weights = body.weights or self.api.config.weights
        if weights == "router" and not everything:
            if body.weights == "router":
                raise ServiceError(403, "weights=router is only for keys that reach every compartment: the router was trained on every "
                                        f"compartment's data, and your key reaches {list(key.allow)}; use weights=density")
            return "density"
        return weights

    # forgetting -----------------------------------------------------------------------------------------------------
    def accept_forget(self, ids: list[str]) -> dict:
        """Run on the forget thread: take the forget into effect (one ledger transaction), under the registration lock."""
        with self.register_lock:
            return self.admin.forget(ids, retrain=False)

    async def forget(self, body: ForgetBody) -> JSONResponse:
        """Forget IDs: in effect (durable, models quarantined) before the 202; retraining in the background."""
        if self.draining:
            raise ServiceError(503, "the server is shutting down: send the forget again later", {"Retry-After": "5"})
        if len(body.ids) > self.limits.max_forget_ids:
            raise ServiceError(422, f"ids: at most {self.limits.max_forget_ids} IDs per request, got {len(body.ids)}")
        ids = sorted(set(body.ids))
        known = self.api.ledger.sample_rows(ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ServiceError(404, f"unknown sample ID(s), nothing was forgotten: {', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
        result = await asyncio.get_running_loop().run_in_executor(self.admin_pool, self.accept_forget, ids)
        if result["request"] is None:
            return JSONResponse({"state": "noop", "message": result["message"], "already_forgotten": result["already_forgotten"]}, status_code=200)
        self.retrainer.request()
        request = result["request"]
        content = {
            "request": request, "state": "accepted", "ids": result["ids"], "already_forgotten": result["already_forgotten"],
            "quarantined_models": result["quarantined_models"], "serving_during_retraining": result["serving_during_retraining"],
            "status_url": f"/v1/forget/{request}",
        }
        return JSONResponse(content, status_code=202, headers={"Location": f"/v1/forget/{request}"})

    def forget_state(self, request_id: str) -> dict:
        """A forget request's state, and whether retraining is running."""
        record = self.api.ledger.forget_request(request_id)
        if record is None:
            raise ServiceError(404, f"unknown forget request {request_id!r}")
        return record | {"retraining": self.retrainer.running and record["state"] == "accepted", "retraining_error": self.retrainer.last_error}

    # reading --------------------------------------------------------------------------------------------------------
    def compartments(self, key: ApiKey) -> dict:
        """What this key may use: its compartments, their sizes and what serves them now."""
        ward = self.api
        counts = ward.ledger.counts()
        sources = ward.ledger.compartment_sources()
        serving = ward.serving_state()
        served = ward.served()
        out = []
        for c in key.allow:
            entry = {"id": c, "source": sources.get(c), "samples": counts.get(c, {}).get("samples", 0),
                     "labels": sorted(counts.get(c, {}).get("labels", {})), "serving": serving.get(str(c), "unknown")}
            if c in served:
                entry["model"] = {"stage": served[c].stage, "fallback": ward.is_fallback(served[c])}
            out.append(entry)
        everything = set(key.allow) >= set(ward.compartments())
        config = ward.config
        return {
            "key": key.name, "admin": key.admin, "compartments": out,
            "weights": {"default": config.weights if everything or config.weights == "density" else "density",
                        "router_allowed": everything},
            "guard": config.guard, "image": {"size": config.image_size, "channels": config.channels}, "latent": config.latent,
            "num_classes": config.num_classes,
            "limits": {"max_n": self.limits.max_n, "max_steps": self.limits.max_steps},
        }

    def readiness(self) -> tuple[bool, dict]:
        """Ready when not draining and at least one compartment is served."""
        served = self.api.served()
        info = {
            "draining": self.draining, "served_compartments": len(served), "pending_forgets": len(self.api.ledger.pending_forgets()),
            "retraining": bool(self.retrainer and self.retrainer.running), "generations": {"admitted": self.admitted, "capacity": self.capacity},
        }
        return (not self.draining and bool(served)), info


def render_result(result: SampleResult, body: GenerateRequest, key: ApiKey, seed: int, known: list[int]) -> bytes:
    """The JSON response body: images (PNG or npz, base64) and per-sample attribution over the key's compartments only."""
    cols = [known.index(c) for c in key.allow]
    attribution = result.attribution  # (N, K_all)
    outside = float(attribution.sum() - attribution[:, cols].sum())
    if abs(outside) > 1e-5 or any(c not in key.allow for c in result.compartments):
        raise RuntimeError(f"attribution outside the key's grant ({outside}); refusing to answer")  # must never happen
    labels = None if result.labels is None else result.labels.tolist()
    samples = []
    for i in range(result.images.shape[0]):
        entry: dict[str, Any] = {
            "label": None if labels is None else labels[i],
            "attribution": {str(c): float(attribution[i, known.index(c)]) for c in key.allow},
            "final_weights": {str(c): float(result.final_weights[i, known.index(c)]) for c in key.allow},
        }
        if body.format == "png" and not body.grid:
            entry["png"] = _png(_to_uint8(result.images[i]))
        samples.append(entry)
    out: dict[str, Any] = {
        "n": body.n, "seed": seed, "steps": body.steps, "sampler": result.sampler, "weights": result.weights,
        "compartments": result.compartments, "allowed": list(key.allow),
        "models": {str(c): info for c, info in result.models.items()},
        "shared_models": ["router"] if result.weights == "router" else [],
        "format": body.format, "seconds": round(result.seconds, 4), "guard_guided": result.guard_guided, "samples": samples,
    }
    if body.format == "png" and body.grid:
        from dataward.plots import grid_array

        out["grid_png"] = _png(grid_array(result.images, scale=1, pad=1))
    if body.format == "npz":
        arrays = {"images": result.images.numpy().astype(np.float32), "attribution": attribution[:, cols].numpy(),
                  "final_weights": result.final_weights[:, cols].numpy(), "compartments": np.array(list(key.allow), dtype=np.int64)}
        if result.labels is not None:
            arrays["labels"] = result.labels.numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        out["npz"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return json.dumps(out).encode()


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, C) uint8."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else array


def _png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# HTTP plumbing -------------------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: 429 at once when generation is full; 413 for bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int, service: Service | None = None):
        self.app = app
        self.limit = limit
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        service = self.service
        if service is not None and scope["path"] == "/v1/generate" and service.admitted >= service.capacity:
            # overload fast path: refuse before reading, parsing or authenticating (says only "busy")
            return await _send_json(send, 429, {"detail": f"busy: {service.admitted} generations running or queued "
                                                          f"(capacity {service.capacity}); retry later"},
                                    [(b"retry-after", service.retry_after().encode())])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._refuse(send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send):
        await _send_json(send, 413, {"detail": f"request body too large: at most {self.limit} bytes"}, [(b"connection", b"close")])


async def _send_json(send, status: int, content: dict, headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(content).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    value = request.headers.get("x-api-key")
    return value.strip() if value and value.strip() else None


def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse({"detail": message, **extra}, status_code=status, headers=headers)


def create_app(
    ward_path: str | Path,
    *,
    pool_size: int = 2,
    queue_size: int = 8,
    limits: ServiceLimits | None = None,
    torch_threads: int | None = None,
) -> FastAPI:
    """The service for one ward.

    ``pool_size`` generations run at once (threads), ``queue_size`` more wait; beyond that: 429 with Retry-After.
    ``torch_threads``: intra-op threads per pool thread (default 1: the small CPU models gain nothing from more, and
    more than the free cores makes OpenMP spin; measured 30x slower on a loaded 2-core machine). Scale with ``pool_size``.
    """
    path = Path(ward_path)
    Ward.open(path, worker=True).close()  # fail now, with the ward's own message, if this is not a ward
    if pool_size < 1 or queue_size < 0:
        raise DatawardError(f"pool_size must be >= 1 and queue_size >= 0, got {pool_size} and {queue_size}")
    limits = limits or ServiceLimits()
    threads = torch_threads or 1
    service = Service(path, pool_size, queue_size, limits, threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="dataward", version=dataward.__version__, lifespan=lifespan,
        description="Generate from a ward composed over the compartments your key may use; forget samples (admin keys). "
                    "Send your key as `Authorization: Bearer KEY` or `X-API-Key: KEY`.",
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes, service=service)

    # errors: a clear message, never a stack trace ----------------------------------------------------------------
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError):
        return _error(error.status, error.message, error.headers)

    @app.exception_handler(DatawardError)
    async def _dataward_error(request: Request, error: DatawardError):
        return _error(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        errors = []
        for e in error.errors():
            where = ".".join(str(part) for part in e.get("loc", ()) if part != "body") or "body"
            message = e.get("msg", "invalid")
            if e.get("type") == "extra_forbidden":
                message = "unknown field (not allowed)"
            if e.get("type") == "json_invalid":
                where, message = "body", f"invalid JSON: {e.get('ctx', {}).get('error', 'cannot parse')}"
            errors.append({"field": where, "message": message})
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return _error(422, f"invalid request: {summary}", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception):
        incident = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", incident, request.method, request.url.path, exc_info=error)
        return _error(500, f"internal error (incident {incident}); the server log has the details")

    # auth -------------------------------------------------------------------------------------------------------
    async def require_key(request: Request) -> ApiKey:
        raw = _presented_key(request)
        if raw is None:
            raise ServiceError(401, "missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`", {"WWW-Authenticate": "Bearer"})
        record = service.api.ledger.key_for_hash(Ledger.hash_key(raw))
        if record is None:
            raise ServiceError(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
        if record["revoked_at"] is not None:
            raise ServiceError(401, "this API key was revoked", {"WWW-Authenticate": "Bearer"})
        return ApiKey(record["id"], record["name"], tuple(sorted(record["allow"])), record["admin"])

    async def require_admin(key: ApiKey = Depends(require_key)) -> ApiKey:
        if not key.admin:
            raise ServiceError(403, "this endpoint needs an admin key (create one with `dataward keys WARD create --admin`)")
        return key

    # endpoints --------------------------------------------------------------------------------------------------
    @app.get("/healthz", summary="Liveness (no key needed; says nothing about the ward)")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: serving models, not shutting down")
    async def readyz(key: ApiKey = Depends(require_key)):
        ready, info = service.readiness()
        return JSONResponse({"ready": ready, **info}, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"})

    @app.get("/v1/compartments", summary="The compartments this key may use")
    async def compartments(key: ApiKey = Depends(require_key)) -> dict:
        return service.compartments(key)

    @app.post("/v1/generate", summary="Generate images composed over this key's compartments, with attribution")
    async def generate(body: GenerateRequest, key: ApiKey = Depends(require_key)) -> Response:
        return await service.generate(body, key)

    @app.post("/v1/forget", status_code=202, summary="Forget sample IDs (admin): in effect before the 202, retraining in the background")
    async def forget(body: ForgetBody, key: ApiKey = Depends(require_admin)) -> JSONResponse:
        return await service.forget(body)

    @app.get("/v1/forget/{request_id}", summary="A forget request's state (admin)")
    async def forget_state(request_id: str, key: ApiKey = Depends(require_admin)) -> dict:
        return service.forget_state(request_id)

    return app
