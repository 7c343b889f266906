"""What crosses the API boundary: the server's limits, request bodies, the authenticated caller and HTTP errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from dataward.assignment import MAX_ID_LENGTH
from dataward.data import MAX_CLASSES


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for. Exceeding a limit is a 4xx naming the field, never a 5xx."""

    max_n: int = 64  # images per generation request
    max_steps: int = 250  # sampling steps per request
    max_body_bytes: int = 6 * 1024 * 1024  # request body size (413 above it): fits max_forget_ids IDs of MAX_ID_LENGTH ASCII characters
    max_forget_ids: int = 10_000  # sample IDs per forget request
    generate_timeout_s: float = 120.0  # a generation running longer is stopped at its next step and answers 503 (waiting in the queue does not count)
    max_attempts: int = 3  # runs of one generation when forgets keep tainting its models (then 503)
    shutdown_timeout_s: float = 30.0  # how long shutdown waits for admitted generations and retraining


class ServiceError(Exception):
    """An HTTP answer with a message (and headers), raised inside the service and rendered by one handler."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def __reduce__(self):  # crosses from process workers to the event loop with its status and headers
        return ServiceError, (self.status, self.message, self.headers)


def client_message(error: Exception, ward: Path) -> str:
    """An error's message for a client: the server's paths (the ward folder, however spelled) replaced by ``WARD``."""
    message = str(error)
    for spelling in sorted({str(ward), str(ward.resolve()), str(ward.absolute())}, key=len, reverse=True):
        message = message.replace(spelling, "WARD")
    return message


def shutting_down(message: str) -> ServiceError:
    """The 503 of a server that is shutting down."""
    return ServiceError(503, f"the server is shutting down: {message}", {"Retry-After": "5"})


class GenerateRequest(BaseModel):
    """POST /v1/generate. Unknown fields are refused (422): the grant comes from the key, never from the body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    n: int = Field(1, ge=1, description="Number of images (at most the server's max_n).")
    label: int | None = Field(None, ge=0, lt=MAX_CLASSES, description="Class label for every image (random by default).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Sampling seed (random by default; echoed back).")
    guard: bool = Field(False, description="Steer away from training data with each compartment's CPSample guard.")
    sampler: Literal["ddpm", "ddim"] | None = Field(None, description="ddpm (needed by density weights) or ddim.")
    steps: int = Field(50, ge=1, description="Sampling steps (at most the server's max_steps).")
    weights: Literal["router", "density", "soup"] | None = Field(None, description="Composition weights: density or soup (one averaged model) for any key; router only for keys reaching every compartment.")
    top_k: int | None = Field(None, ge=1, description="Evaluate only the k heaviest compartments per sample and step.")
    format: Literal["png", "npz"] = Field("png", description="png: base64 PNGs; npz: one base64 .npz (images, labels, attribution).")
    grid: bool = Field(False, description="With png: one grid image instead of one PNG per sample.")


SampleId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


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
