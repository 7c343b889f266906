"""The service one app holds: its wards, the generation pool, forget acceptance and the retrainer; what a key may see."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from fastapi.responses import JSONResponse, Response

from dataward.app.service.pool import ClientGone, GenerationPool, WorkerKind
from dataward.app.service.retraining import Retrainer, open_retraining_ward
from dataward.app.service.api import ApiKey, ForgetBody, GenerateRequest, ServiceError, ServiceLimits, shutting_down
from dataward.errors import echo
from dataward.forgetting import UnknownSampleIds
from dataward.sampling.plan import sampling_weights
from dataward.ward import Ward

log = logging.getLogger("dataward.app.service")


class Service:
    """Everything the app holds. ``api`` is the event loop's ward (key checks, the forget check, read-only views);
    ``admin`` is the forget thread's; the retrainer and every generation worker have their own."""

    def __init__(self, path: Path, pool_size: int, queue_size: int, limits: ServiceLimits, torch_threads: int, worker_kind: WorkerKind):
        self.path = path
        self.limits = limits
        self.torch_threads = torch_threads
        self.generations = GenerationPool(path, pool_size, queue_size, limits, torch_threads, worker_kind)
        self.api: Ward | None = None
        self.admin: Ward | None = None
        self.admin_pool: ThreadPoolExecutor | None = None
        self.retrainer: Retrainer | None = None

    @property
    def admitted(self) -> int:
        """Generations admitted and not finished."""
        return self.generations.admitted

    @property
    def draining(self) -> bool:
        """True once shutdown began: new generations and forgets are refused (503)."""
        return self.generations.draining

    # lifecycle ------------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the wards (the first one, non-worker, cleans up after a crash), start the pools and the retrainer."""
        torch.set_num_threads(self.torch_threads)
        trainer = open_retraining_ward(self.path)
        self.api = Ward.open(self.path, worker=True)
        self.admin = Ward.open(self.path, worker=True)
        self.generations.start()
        self.admin_pool = ThreadPoolExecutor(1, thread_name_prefix="dataward-forget")
        self.retrainer = Retrainer(trainer, self.torch_threads)
        self.retrainer.start()

    async def stop(self) -> None:
        """Refuse new work, let admitted generations finish (up to the timeout), stop retraining, close the wards."""
        deadline = time.monotonic() + self.limits.shutdown_timeout_s
        await self.generations.drain(deadline)
        self.admin_pool.shutdown(wait=True)
        remaining = max(0.0, deadline - time.monotonic())
        if not await asyncio.to_thread(self.retrainer.stop, remaining):
            log.warning("retraining still running at shutdown; the ledger keeps the forget pending and the next start resumes it")
        self.api.close()
        self.admin.close()

    # generating and forgetting ------------------------------------------------------------------------------------
    async def generate(self, body: GenerateRequest, key: ApiKey, client_gone: ClientGone | None = None) -> Response:
        """A generation over the key's compartments, stopped if ``client_gone`` returns (see :meth:`GenerationPool.generate`)."""
        return await self.generations.generate(body, key, self.api, client_gone)

    async def forget(self, body: ForgetBody) -> JSONResponse:
        """Forget IDs: in effect (durable, models quarantined) before the 202; retraining in the background."""
        if self.draining:
            raise shutting_down("send the forget again later")
        if len(body.ids) > self.limits.max_forget_ids:
            raise ServiceError(422, f"ids: at most {self.limits.max_forget_ids} IDs per request, got {len(body.ids)}")
        try:  # one ledger transaction on the forget thread; the 202 is returned on the event loop after it committed
            result = await asyncio.get_running_loop().run_in_executor(self.admin_pool, self.admin.accept_forget, body.ids)
        except UnknownSampleIds as unknown:
            raise ServiceError(404, str(unknown)) from None
        if result.request is None:
            return JSONResponse(asdict(result), status_code=200)
        self.retrainer.request()
        status_url = f"/v1/forget/{result.request}"
        return JSONResponse(asdict(result) | {"status_url": status_url}, status_code=202, headers={"Location": status_url})

    def forget_state(self, request_id: str) -> dict:
        """A forget request's state, and whether retraining is running."""
        record = self.api.ledger.forget_request(request_id)
        if record is None:
            raise ServiceError(404, f"unknown forget request {echo(request_id)!r}")
        return record | {"retraining": self.retrainer.running and record["state"] == "accepted", "retraining_error": self.retrainer.last_error,
                         "retry_in_seconds": self.retrainer.retry_in_seconds}

    # reading --------------------------------------------------------------------------------------------------------
    def compartments(self, key: ApiKey) -> dict:
        """What this key may use: its compartments; for admin keys also their live sizes and what serves them now (a
        customer's key sees whether each is served, nothing that changes when someone is forgotten)."""
        ward = self.api
        counts = ward.ledger.counts()
        sources = ward.ledger.compartment_sources()
        serving = ward.serving_state()
        models = ward.read()
        served = models.served()
        out = []
        for c in key.allow:
            entry = {"id": c, "source": sources.get(c), "labels": sorted(counts.get(c, {}).get("labels", {}))}
            if not key.admin:  # live counts and fallbacks would tell a customer that someone asked to be forgotten
                out.append(entry | {"serving": "served" if c in served else "not served now"})
                continue
            entry |= {"samples": counts.get(c, {}).get("samples", 0), "serving": serving.get(str(c), "unknown")}
            if c in served:
                entry["model"] = {"stage": served[c].stage, "fallback": models.is_fallback(served[c])}
            out.append(entry)
        everything = set(key.allow) >= set(ward.compartments())
        config = ward.config
        return {
            "key": key.name, "admin": key.admin, "compartments": out,
            "weights": {"default": sampling_weights(None, config.weights, key.allow, ward.compartments()),
                        "router_allowed": everything},
            "guard": config.guard, "image": {"size": config.image_size, "channels": config.channels}, "latent": config.latent,
            "num_classes": config.num_classes,
            "limits": {"max_n": self.limits.max_n, "max_steps": self.limits.max_steps},
        }

    def readiness(self, admin: bool) -> tuple[bool, dict]:
        """Ready when not draining and at least one compartment is served. Whether forgets are pending and retraining runs
        is said to admin keys only (it tells that someone asked to be forgotten)."""
        served = self.api.served()
        pool = self.generations
        info = {"draining": self.draining, "served_compartments": len(served),
                "generations": {"admitted": pool.admitted, "capacity": pool.capacity}}
        if admin:
            info |= {"pending_forgets": len(self.api.ledger.pending_forgets()), "retraining": bool(self.retrainer and self.retrainer.running)}
        return (not self.draining and bool(served)), info
