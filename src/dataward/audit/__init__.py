"""The audit: quality, replication, membership inference, forgetting and privacy of a ward, as JSON and HTML.

:func:`audit_ward` runs every section it can for a ward and returns a JSON-ready dict with stable keys (documented in
docs/audit.md). A section the ward cannot support (no held-out data, no guard, nothing forgotten, no DP model) is kept
with ``"status": "skipped"`` and a ``"reason"``; an unexpected failure is kept as ``"status": "error"`` unless
``strict=True``. The sections are in :mod:`dataward.audit.sections`, over the ward protocol of
:mod:`dataward.audit.protocol`; metrics live in :mod:`dataward.audit.metrics` and :mod:`dataward.audit.attacks`, feature
networks in :mod:`dataward.audit.features`, the HTML page in :mod:`dataward.audit.report` (figures: :mod:`dataward.audit.figures`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from dataward.audit.attacks import DEFAULT_TIMESTEPS, AttackResult, forgetting_attack, loss_attack, pia, pooled_rank_auc, roc
from dataward.audit.choices import cached_features
from dataward.audit.features import FeatureExtractor, FeatureNet, FeatureNetConfig, digits_feature_net, inception_features, module_features
from dataward.audit.metrics import Replication, downstream_accuracy, frechet_distance, recompute_epsilon, replication
from dataward.audit.protection import protection
from dataward.audit.protocol import AuditedWard
from dataward.audit.report import write_html
from dataward.audit.sections import (
    Audit, Sections, draw_samples, forgetting, membership, privacy, quality, replication_section, ward_summary,
)
from dataward.data import Dataset

SCHEMA = "dataward.audit/3"
SECTIONS = ("quality", "replication", "membership", "forgetting", "privacy", "protection")

__all__ = [
    "DEFAULT_TIMESTEPS", "AttackResult", "AuditedWard", "FeatureNet", "FeatureNetConfig", "Replication", "SCHEMA", "SECTIONS",
    "audit_ward", "digits_feature_net", "downstream_accuracy", "forgetting_attack", "frechet_distance", "inception_features",
    "loss_attack", "module_features", "pia", "pooled_rank_auc", "recompute_epsilon", "replication", "roc",
]


def audit_ward(
    ward: AuditedWard,
    n: int = 1000,
    *,
    seed: int = 0,
    steps: int = 50,
    sampler: str | None = None,
    grid: int = 64,
    members: int = 300,
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS,
    features: FeatureExtractor | torch.nn.Module | None = None,
    inception: str | Path | None = None,
    heldout: Dataset | None = None,
    guard: bool | None = None,
    verify: bool = False,
    html: str | Path | None = None,
    strict: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Audit a ward: quality, replication, membership inference, forgetting and privacy. Returns the JSON-ready report.

    ``n`` samples are drawn from the composed model (seed ``seed``, ``steps`` sampler steps) for FD, CAS and
    replication; ``grid`` more per compartment for the pictures and per-compartment FD. Membership inference
    attacks each compartment's denoiser with up to ``members`` of its training samples against the held-out set
    (raw, and guarded when the ward has guards and ``guard`` is not False). ``verify=True`` adds the bitwise forgetting
    certificate (retrains every model: slow). ``features``/``inception`` replace the digits feature net; ``heldout``
    replaces the ward's held-out set. ``html`` also writes the HTML report there. Keys: docs/audit.md.
    """
    started = time.perf_counter()
    say = progress or _silent
    compartments = list(ward.compartments())
    train = ward.training_data()
    heldout = heldout if heldout is not None else ward.heldout_data()
    report = {
        "schema": SCHEMA,
        "ward": ward_summary(ward, compartments, train, heldout),
        "settings": {"n": n, "seed": seed, "steps": steps, "sampler": sampler, "grid": grid, "members": members, "timesteps": list(timesteps)},
    }
    report["sampling"], samples = draw_samples(ward, n, grid, compartments, seed=seed, steps=steps, sampler=sampler, say=say)
    audit = Audit(
        ward, compartments, train, heldout, samples, cached_features(str(ward.config.data), heldout, features, inception),
        seed=seed, steps=steps, members=members, timesteps=tuple(timesteps), guard=bool(ward.config.guard) if guard is None else guard,
        verify=verify, say=say,
    )
    sections = Sections(strict, timings={"sampling": report["sampling"]["seconds"]}, artifacts=samples.artifacts(compartments))
    sections.run("quality", lambda: quality(audit))
    sections.run("replication", lambda: replication_section(audit))
    sections.run("membership", lambda: membership(audit))
    sections.run("forgetting", lambda: forgetting(audit, sections.entries["membership"]))
    sections.run("privacy", lambda: privacy(ward))
    sections.run("protection", lambda: protection(audit))
    report |= sections.entries
    report["timings"] = sections.timings | {"total": round(time.perf_counter() - started, 3)}
    if html is not None:
        write_html(html, report, sections.artifacts)
    return report


def _silent(message: str) -> None:
    """The default progress callback: says nothing."""
