"""What the audit needs from a ward, as :class:`typing.Protocol` classes.

:class:`dataward.ward.Ward` satisfies :class:`AuditedWard` (its :meth:`~dataward.ward.Ward.read` gives the
:class:`ServedDenoisers`), and so does the closed-form :class:`dataward.audit.standin.StandInWard` (its own served
denoisers); the audit uses nothing else of a ward.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from dataward.certificate import Certificate
from dataward.data import Dataset
from dataward.diffusion.sampling import Denoiser

if TYPE_CHECKING:
    from diffusers import DDPMScheduler


class AuditedConfig(Protocol):
    """The ward settings the audit reads."""

    @property
    def data(self) -> str:
        """The data source spec the ward was made from (``"dataset"`` for an in-memory dataset)."""

    @property
    def guard(self) -> bool:
        """Whether the ward has CPSample guards (then their guarded denoisers are attacked too)."""

    @property
    def image_size(self) -> int:
        """Forgotten samples re-read from the data source are resized to this."""

    @property
    def channels(self) -> int:
        """... and converted to this many channels."""


class ForgetLedger(Protocol):
    """The part of the ledger that says which samples were forgotten and where they were, and what was exported; and
    where the audit records what it measured of each compartment's protection."""

    def forgotten_ids(self) -> list[str]:
        """Every forgotten sample ID, sorted."""

    def sample_rows(self, ids: list[str]) -> dict[str, tuple]:
        """``id -> (compartment, slice, forgotten_at)`` for the known IDs among ``ids``."""

    def events_of(self, kind: str) -> list[dict]:
        """Every recorded event of ``kind`` (the audit reads ``export`` and ``certificate`` events)."""

    def record_event(self, kind: str, **detail) -> None:
        """Record an event (the audit records one: its ``protection`` rows, which ``dataward status`` shows)."""

    def latest_model_id(self) -> int:
        """The newest model's ID: whether a model was registered since an event."""


class Samples(Protocol):
    """What :meth:`AuditedWard.sample` returns."""

    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: torch.Tensor | None  # (N,) or None for an unconditional ward
    attribution: torch.Tensor  # (N, K) trajectory-averaged weight per compartment
    compartments: list[int]  # the compartments that were composed
    weights: str  # router | density | single
    sampler: str
    guard_guided: float | None  # with guard=True: the share of guard checks that steered


class ServedDenoisers(Protocol):
    """The models a ward serves, as one audit section reads them (:class:`dataward.sampling.served.ServedModels` is one)."""

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the denoisers see them (their latents in a latent ward)."""

    def denoiser(self, compartment: int, guard: bool = False) -> Denoiser:
        """One compartment's served ε-prediction (guard-guided if ``guard``); raises DatawardError when there is none."""


@runtime_checkable
class AuditedWard(Protocol):
    """A ward as the audit sees it: data, samples, denoisers, forgotten IDs and privacy records."""

    path: Path
    config: AuditedConfig
    scheduler: DDPMScheduler  # the training scheduler: ``add_noise`` for the attacks
    ledger: ForgetLedger

    def compartments(self) -> list[int]:
        """The compartment numbers, sorted."""

    def training_data(self, compartment: int | None = None) -> Dataset:
        """The live training samples of one compartment, or of all (images in [-1, 1])."""

    def heldout_data(self) -> Dataset | None:
        """Real samples no model saw, or None when the data source has none."""

    def read(self) -> ServedDenoisers:
        """The models it serves now (a section that attacks several compartments reads them once)."""

    def sample(self, n: int, *, seed: int = 0, sampler: str | None = None, steps: int = 50, allowed: list[int] | None = None,
               guard: bool = False) -> Samples:
        """``n`` images composed over the ``allowed`` compartments (all by default); ``sampler=None``: the ward's default."""

    def privacy(self) -> dict | None:
        """The ward's (ε, δ) records per compartment (:meth:`dataward.ward.Ward.privacy`), None without DP."""

    def verify(self) -> Certificate:
        """The bitwise forgetting certificate (:meth:`dataward.ward.Ward.verify`: retrains every model)."""
