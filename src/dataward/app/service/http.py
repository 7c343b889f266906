"""The HTTP layer: the FastAPI app (:func:`create_app`), its auth dependencies, routes, error mapping and body limit."""

from __future__ import annotations

import json
import logging
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import dataward
from dataward.app.service.core import Service
from dataward.app.service.pool import WorkerKind
from dataward.app.service.api import ApiKey, ForgetBody, GenerateRequest, ServiceError, ServiceLimits, client_message
from dataward.errors import DatawardError, LedgerUnavailable, echo
from dataward.store.ledger import Ledger
from dataward.ward import Ward

log = logging.getLogger("dataward.app.service")
LEDGER_RETRY_AFTER_S = 5  # seconds a client waits before trying again while the ledger database is unreachable


def create_app(
    ward_path: str | Path,
    *,
    pool_size: int = 2,
    queue_size: int = 8,
    limits: ServiceLimits | None = None,
    torch_threads: int | None = None,
    worker_kind: WorkerKind = "processes",
) -> FastAPI:
    """The service for one ward.

    ``pool_size`` generations run at once, ``queue_size`` more wait; beyond that: 429 with Retry-After. ``worker_kind``:
    ``processes`` (each worker a process with its own models: throughput grows with ``pool_size``) or ``threads`` (in
    this process, sharing the GIL: lighter, for tests and small models). ``torch_threads``: intra-op threads per worker
    (default 1: the small CPU models gain nothing from more; keep ``pool_size`` x threads <= the free cores).
    """
    path = Path(ward_path)
    Ward.open(path, worker=True).close()  # fail now, with the ward's own message, if this is not a ward
    if pool_size < 1 or queue_size < 0 or worker_kind not in ("processes", "threads"):
        raise DatawardError(f"pool_size must be >= 1, queue_size >= 0 and worker_kind processes or threads; got {pool_size}, {queue_size} and {worker_kind!r}")
    limits = limits or ServiceLimits()
    service = Service(path, pool_size, queue_size, limits, torch_threads or 1, worker_kind)

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
    app.add_middleware(RequestGate, limit=limits.max_body_bytes, service=service)
    add_error_handlers(app)
    app.include_router(router)
    return app


# auth ----------------------------------------------------------------------------------------------------------------
def _service(request: Request) -> Service:
    return request.app.state.service


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    value = request.headers.get("x-api-key")
    return value.strip() if value and value.strip() else None


async def require_key(request: Request) -> ApiKey:
    """The caller's key, looked up by its SHA-256 in the ledger on every request (401 when missing, unknown or revoked)."""
    raw = _presented_key(request)
    if raw is None:
        raise ServiceError(401, "missing API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`", {"WWW-Authenticate": "Bearer"})
    record = _service(request).api.ledger.key_for_hash(Ledger.hash_key(raw))
    if record is None:
        raise ServiceError(401, "invalid API key", {"WWW-Authenticate": "Bearer"})
    if record["revoked_at"] is not None:
        raise ServiceError(401, "this API key was revoked", {"WWW-Authenticate": "Bearer"})
    return ApiKey(record["id"], record["name"], tuple(sorted(record["allow"])), record["admin"])


async def require_admin(key: ApiKey = Depends(require_key)) -> ApiKey:
    """The caller's key if it is an admin key (403 otherwise)."""
    if not key.admin:
        raise ServiceError(403, "this endpoint needs an admin key (create one with `dataward keys WARD create --admin`)")
    return key


# endpoints -----------------------------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/healthz", summary="Liveness (no key needed; says nothing about the ward)")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: serving models, not shutting down")
async def readyz(request: Request, key: ApiKey = Depends(require_key)):
    ready, info = _service(request).readiness(key.admin)
    return JSONResponse({"ready": ready, **info}, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"})


@router.get("/v1/compartments", summary="The compartments this key may use")
async def compartments(request: Request, key: ApiKey = Depends(require_key)) -> dict:
    return _service(request).compartments(key)


@router.post("/v1/generate", summary="Generate images composed over this key's compartments, with attribution")
async def generate(request: Request, body: GenerateRequest, key: ApiKey = Depends(require_key)) -> Response:
    return await _service(request).generate(body, key, lambda: _client_gone(request))


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the body was read already: the server sends nothing else until then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/v1/forget", status_code=202, summary="Forget sample IDs (admin): in effect before the 202, retraining in the background")
async def forget(request: Request, body: ForgetBody, key: ApiKey = Depends(require_admin)) -> JSONResponse:
    return await _service(request).forget(body)


@router.get("/v1/forget/{request_id}", summary="A forget request's state (admin)")
async def forget_state(request: Request, request_id: str, key: ApiKey = Depends(require_admin)) -> dict:
    return _service(request).forget_state(request_id)


# errors: a clear message, never a stack trace ------------------------------------------------------------------------
def _error(status: int, message: str, headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    return JSONResponse({"detail": message, **extra}, status_code=status, headers=headers)


async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
    return _error(error.status, error.message, error.headers)


async def _dataward_error(request: Request, error: DatawardError) -> JSONResponse:
    return _error(400, client_message(error, _service(request).path))


async def _ledger_unavailable(request: Request, error: LedgerUnavailable) -> JSONResponse:
    log.warning("ledger unavailable on %s %s: %s", request.method, request.url.path, error)
    return _error(503, "the ward's ledger cannot be reached right now, so nothing can be checked or served; try again",
                  {"Retry-After": str(LEDGER_RETRY_AFTER_S)})


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = []
    for e in error.errors():
        where = echo(".".join(str(part) for part in e.get("loc", ()) if part != "body")) or "body"  # an unknown field's name is input
        message = e.get("msg", "invalid")
        if e.get("type") == "extra_forbidden":
            message = "unknown field (not allowed)"
        if e.get("type") == "json_invalid":
            where, message = "body", f"invalid JSON: {e.get('ctx', {}).get('error', 'cannot parse')}"
        errors.append({"field": where, "message": message})
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return _error(422, f"invalid request: {summary}", errors=errors)


async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    return _error(error.status_code, str(error.detail), getattr(error, "headers", None))


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s %s", incident, request.method, request.url.path, exc_info=error)
    return _error(500, f"internal error (incident {incident}); the server log has the details")


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"detail": ...}``: service errors with their status, DatawardError 400, an unreachable
    ledger 503 with Retry-After (fail closed: no answer the ledger could not check), validation 422,
    anything unexpected 500 with an incident ID for the server log (never a stack trace to a client)."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(DatawardError, _dataward_error)
    app.add_exception_handler(LedgerUnavailable, _ledger_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


# before the app: the overload fast path, no query strings, the body limit ---------------------------------------------
class RequestGate:
    """ASGI middleware: 429 at once when generation is full; 400 for any query string (the API takes none, and a key put
    in a URL would be written to access logs: it is blanked before uvicorn logs the request); 413 for bodies over
    ``limit`` bytes (declared or streamed)."""

    def __init__(self, app, limit: int, service: Service):
        self.app = app
        self.limit = limit
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope.get("query_string"):
            scope["query_string"] = b""  # uvicorn's access log writes the path with the query string of this scope
            return await _send_json(send, 400, {"detail": "this API takes no query parameters; send your key in the "
                                                          "`Authorization: Bearer KEY` or `X-API-Key` header, never in a URL"}, [])
        pool = self.service.generations
        if scope["path"] == "/v1/generate" and pool.admitted >= pool.capacity:
            # overload fast path: refuse before reading, parsing or authenticating (says only "busy")
            busy = pool.busy()
            return await _send_json(send, 429, {"detail": busy.message}, [(b"retry-after", busy.headers["Retry-After"].encode())])
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

