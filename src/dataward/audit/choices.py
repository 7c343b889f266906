"""What the audit measures with: the feature network (:class:`AuditFeatures`, chosen by :func:`pick_features`) and
:class:`Skip`, raised where a section, or the choice of its features, does not apply to a ward."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dataward.audit.features import (BENCHMARK_FEATURE_NETS, FeatureExtractor, FeatureNet, ModuleFeatures, benchmark_feature_net,
                                     digits_feature_net, inception_features, module_features)
from dataward.data import Dataset


class Skip(Exception):
    """A section that does not apply to this ward; the message is the reason."""


@dataclass(frozen=True)
class AuditFeatures:
    """The feature network of the audit, whatever the user passed."""

    extract: FeatureExtractor  # features for FD
    copy: FeatureExtractor  # features for the replication cosine (the digits net's spatial conv features)
    info: dict[str, Any]  # JSON-ready description, with the net's held-out accuracy when known

    @classmethod
    def of(cls, extractor: FeatureExtractor) -> "AuditFeatures":
        """Describe an extractor: the digits net and user modules describe themselves, a bare callable by its type."""
        if isinstance(extractor, FeatureNet):
            return cls(extractor, extractor.copy_features, extractor.info())
        if isinstance(extractor, ModuleFeatures):
            return cls(extractor, extractor, extractor.info())
        return cls(extractor, extractor, {"name": type(extractor).__name__, "heldout_accuracy": None})


def pick_features(data: str, heldout: Dataset | None, features: FeatureExtractor | torch.nn.Module | None,
                  inception: str | Path | None) -> AuditFeatures:
    """Local Inception weights, else the user's module or extractor, else the digits net for digits data and the pinned
    28x28 net for mnist / fashion-mnist data (not for a ward of their test split: the net trained on it); else Skip."""
    if inception is not None:
        return AuditFeatures.of(inception_features(inception))
    if isinstance(features, torch.nn.Module):
        return AuditFeatures.of(module_features(features))
    if features is not None:
        return AuditFeatures.of(features)
    if data.startswith("digits") or heldout is not None and tuple(heldout.shape) == (1, 8, 8):
        return AuditFeatures.of(digits_feature_net())
    name, _, options = data.partition(":")
    if name in BENCHMARK_FEATURE_NETS:
        if "split=test" in options.split(","):
            raise Skip(f"the {name} feature net trained on {name}'s test split, which this ward holds: pass features= or inception=")
        return AuditFeatures.of(benchmark_feature_net(name))
    raise Skip("no feature network for this data: pass features= (a torch module) or inception= (a local safetensors file)")


def cached_features(data: str, heldout: Dataset | None, features: FeatureExtractor | torch.nn.Module | None,
                    inception: str | Path | None) -> Callable[[], AuditFeatures]:
    """:func:`pick_features` on first call, kept once it succeeds (a Skip is raised again on every call)."""
    return functools.cache(functools.partial(pick_features, data, heldout, features, inception))
