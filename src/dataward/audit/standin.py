"""A closed-form stand-in ward for tests and benchmarks of the audit: no training, known answers.

Compartment 0's denoiser is the *optimal denoiser of its empirical data* (it memorizes: samples are training copies,
membership inference wins); compartment 1's is the optimal denoiser of a Gaussian fitted to its data (it never
memorizes). It satisfies :class:`dataward.audit.protocol.AuditedWard`, the ward as :func:`dataward.audit.audit_ward`
sees it; its "forgotten" samples are still in compartment 0's memory (a forget that did not work).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dataward.certificate import Certificate
from dataward.data import Dataset, load_source
from dataward.errors import DatawardError
from dataward.diffusion.sampling import make_sampler, make_training_scheduler, sample_loop


def empirical_denoiser(bank: torch.Tensor, alpha_bar: torch.Tensor):
    """ε of the optimal denoiser for the empirical distribution of ``bank`` (M, C, H, W): E[ε | x_t] in closed form."""
    flat = bank.flatten(1)

    def eps(x_t, t, y=None):
        a = alpha_bar[int(t)]
        d2 = torch.cdist(x_t.flatten(1), a.sqrt() * flat).pow(2)  # (N, M)
        w = torch.softmax(-d2 / (2 * (1 - a)), dim=1)
        x0 = (w @ flat).view_as(x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return eps


def gaussian_denoiser(bank: torch.Tensor, alpha_bar: torch.Tensor):
    """ε of the optimal denoiser for a Gaussian N(μ, Σ) fitted to ``bank``: sqrt(1−ᾱ) (ᾱΣ + (1−ᾱ)I)⁻¹ (x_t − sqrt(ᾱ) μ)."""
    flat = bank.flatten(1).double()
    mu = flat.mean(0)
    sigma = torch.cov(flat.T) + 1e-4 * torch.eye(flat.shape[1], dtype=torch.float64)

    def eps(x_t, t, y=None):
        a = alpha_bar[int(t)].double()
        precision = torch.linalg.inv(a * sigma + (1 - a) * torch.eye(len(mu), dtype=torch.float64))
        out = (1 - a).sqrt() * (x_t.flatten(1).double() - a.sqrt() * mu) @ precision
        return out.view_as(x_t).to(x_t.dtype)

    return eps


class StandInLedger:
    """The forgotten IDs of the stand-in, all in compartment 0 (the :class:`~dataward.audit.protocol.ForgetLedger` part)."""

    def __init__(self, forgotten: list[str]):
        self._forgotten = sorted(forgotten)
        self._events: list[dict] = []

    def forgotten_ids(self) -> list[str]:
        """Every forgotten sample ID, sorted."""
        return list(self._forgotten)

    def sample_rows(self, ids: list[str]) -> dict[str, tuple]:
        """``id -> (compartment, slice, forgotten_at)`` for the forgotten IDs among ``ids``."""
        known = set(self._forgotten)
        return {i: (0, 0, "stand-in") for i in ids if i in known}

    def events_of(self, kind: str) -> list[dict]:
        """The events the audit recorded here (the stand-in exports and certifies nothing)."""
        return [e for e in self._events if e["kind"] == kind]

    def record_event(self, kind: str, **detail) -> None:
        """Keep an event in memory (the audit records its protection rows)."""
        self._events.append({"kind": kind, "detail": detail})

    def latest_model_id(self) -> int:
        """The stand-in registers no models."""
        return 0


@dataclass
class StandInResult:
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: torch.Tensor | None
    attribution: torch.Tensor  # (N, K)
    final_weights: torch.Tensor
    compartments: list[int]
    weights: str = "single"
    sampler: str = "ddim"
    guard_guided: float | None = None


class StandInWard:
    """Two compartments of digits (a memorizer and a Gaussian), the digits held-out split, optional forgotten samples."""

    def __init__(self, per_compartment: int = 200, forgotten: int = 0, privacy: dict | None = None, seed: int = 0):
        data = load_source(f"digits:subset={2 * per_compartment + forgotten},seed={seed}")
        ids = list(data.ids)
        self.path = Path("stand-in")
        self.config = type("Config", (), {"data": "digits", "guard": False, "image_size": 8, "channels": 1})()
        self.scheduler = make_training_scheduler()
        self.ledger = StandInLedger(ids[:forgotten])
        live = ids[forgotten:]
        self._parts = [data.select(live[:per_compartment]), data.select(live[per_compartment:])]
        self._privacy = privacy
        # the memorizer was trained on its compartment AND the forgotten samples (a forget that did not work)
        bank0 = self._parts[0].images if not forgotten else torch.cat([self._parts[0].images, data.select(ids[:forgotten]).images])
        alpha_bar = self.scheduler.alphas_cumprod
        self._eps = [empirical_denoiser(bank0, alpha_bar), gaussian_denoiser(self._parts[1].images, alpha_bar)]

    def compartments(self) -> list[int]:
        return [0, 1]

    def training_data(self, compartment: int | None = None) -> Dataset:
        if compartment is None:
            a, b = self._parts
            return Dataset(a.ids + b.ids, torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), num_classes=10)
        return self._parts[compartment]

    def heldout_data(self) -> Dataset:
        return load_source("digits:heldout")

    def read(self) -> "StandInWard":
        """Its served denoisers: the closed-form ones (:class:`~dataward.audit.protocol.ServedDenoisers`)."""
        return self

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        return images  # a pixel-space ward

    def denoiser(self, compartment: int, guard: bool = False):
        if guard:
            raise DatawardError(f"compartment {compartment} has no trained guard")
        return self._eps[compartment]

    def privacy(self) -> dict | None:
        return self._privacy

    def verify(self) -> Certificate:
        raise DatawardError("the stand-in ward has no trained models to retrain: the forgetting certificate needs a real ward")

    def sample(self, n: int, *, seed: int = 0, sampler: str | None = None, steps: int = 50, allowed: list[int] | None = None,
               guard: bool = False) -> StandInResult:
        if guard:
            raise DatawardError("the stand-in ward has no guards")
        sampler = sampler or "ddim"
        use = allowed or [0, 1]
        generator = torch.Generator().manual_seed(seed)
        labels = torch.randint(0, 10, (n,), generator=generator)
        x_T = torch.randn(n, 1, 8, 8, generator=generator)
        owner = torch.arange(n) % len(use)
        images = torch.empty(n, 1, 8, 8)
        for j, c in enumerate(use):
            rows = owner == j
            images[rows] = sample_loop(self._eps[c], x_T[rows], make_sampler(self.scheduler, sampler), steps=steps, generator=generator)
        attribution = torch.zeros(n, 2)
        attribution[torch.arange(n), torch.tensor(use)[owner]] = 1.0
        # stand-in "labels": the class of the nearest training image, so CAS has something to learn from
        train = self.training_data()
        labels = train.labels[torch.cdist(images.flatten(1), train.images.flatten(1)).argmin(1)]
        return StandInResult(((images.clamp(-1, 1) + 1) / 2), labels, attribution, attribution.clone(), use, "stand-in", sampler)
