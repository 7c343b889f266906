"""Sampling from a ward, the main user path: :mod:`~dataward.sampling.served` (the read side: the models a request is
served by), :mod:`~dataward.sampling.plan` (a request checked and composed into one denoiser, the one sampling loop,
attribution), :mod:`~dataward.sampling.soups` (weight averages), :mod:`~dataward.sampling.pipeline` (``WardPipeline``,
a diffusers pipeline over a ward) and :mod:`~dataward.sampling.export` (a soup as a stock ``DDPMPipeline`` folder).

The names below import torch and diffusers when first used (PEP 562), as the package's top level does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dataward import lazy_exports

_PUBLIC = {  # name -> the module that defines it
    "WardPipeline": "dataward.sampling.pipeline", "SampleRequest": "dataward.sampling.plan",
    "SampleResult": "dataward.sampling.plan", "ServedModels": "dataward.sampling.served",
    "export_ward": "dataward.sampling.export",
}
__all__ = list(_PUBLIC)

if TYPE_CHECKING:
    from dataward.sampling.export import export_ward
    from dataward.sampling.pipeline import WardPipeline
    from dataward.sampling.plan import SampleRequest, SampleResult
    from dataward.sampling.served import ServedModels


__getattr__ = lazy_exports(__name__, _PUBLIC)
