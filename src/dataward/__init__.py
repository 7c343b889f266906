"""dataward: train and serve diffusion models that protect their training data.

The public API: :class:`Ward` (create/open, train, sample, forget, verify, add, status) and its typed results
(:class:`TrainResult`, :class:`AddResult`, :class:`ForgetResult`, :class:`Certificate`, :class:`WardStatus`,
:class:`SampleResult`), :class:`WardPipeline` (a diffusers pipeline over a ward), :class:`TrainConfig`,
:class:`DPConfig`, :class:`GuardConfig`, and data sources via :func:`load_source`.

Importing the package only chooses the CPU settings torch reads when it loads (:mod:`dataward.numerics`,
:mod:`dataward.openmp`); the API's names import torch and diffusers when first used, so ``dataward --help`` answers
at once.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

from dataward import numerics, openmp

__version__ = "0.1.0"

numerics.select_from_environment()  # first: before torch loads
openmp.select_from_environment()

_PUBLIC = {  # name -> the module that defines it
    "Ward": "dataward.ward", "WardConfig": "dataward.ward", "SampleResult": "dataward.ward", "ForgetResult": "dataward.forgetting",
    "TrainResult": "dataward.changes", "AddResult": "dataward.changes", "Certificate": "dataward.certificate",
    "WardStatus": "dataward.ward_status",
    "TrainConfig": "dataward.config", "DPConfig": "dataward.config", "GuardConfig": "dataward.config",
    "WardPipeline": "dataward.sampling.pipeline", "Dataset": "dataward.data", "load_source": "dataward.data", "DatawardError": "dataward.errors",
}
__all__ = [*_PUBLIC, "__version__"]

if TYPE_CHECKING:
    from dataward.certificate import Certificate
    from dataward.changes import AddResult, TrainResult
    from dataward.config import DPConfig, GuardConfig, TrainConfig
    from dataward.data import Dataset, load_source
    from dataward.errors import DatawardError
    from dataward.forgetting import ForgetResult
    from dataward.sampling.pipeline import WardPipeline
    from dataward.ward import SampleResult, Ward, WardConfig
    from dataward.ward_status import WardStatus


def lazy_exports(package: str, table: dict[str, str]):
    """A package's ``__getattr__`` (PEP 562) that imports each name of ``table`` (name -> defining module) on first use
    and keeps it in the package (``dataward`` and ``dataward.sampling`` use it)."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__getattr__ = lazy_exports(__name__, _PUBLIC)
