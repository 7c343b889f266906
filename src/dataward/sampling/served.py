"""The read side of a ward: the models it serves now, loaded once and turned into denoisers.

:class:`ServedModels` is made once per request (a sample, a pipeline call, an export, an audit section) from the ward's
planner, its model cache and its ``on_load`` hook: it reads which model serves each compartment once per kind, so every
part of the request sees the same records. Sampling (:mod:`dataward.sampling.plan`), ``WardPipeline``, exports, the
audit and the job runner (its loader: the base a compartment starts from, the autoencoder whose latents it trains on)
all load models here; :class:`dataward.ward.Ward` makes it (:meth:`dataward.ward.Ward.read`) and is not called back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from diffusers import DDPMScheduler

from dataward.config import WardConfig
from dataward.data import Dataset
from dataward.diffusion.batched import StackedDenoisers
from dataward.diffusion.latent import LatentCodec
from dataward.diffusion.sampling import Denoiser, unet_eps
from dataward.errors import DatawardError
from dataward.models.adapters import load_merged
from dataward.models.guard import GuardActivity, guard_guidance, guarded
from dataward.sampling.soups import average_models
from dataward.store.checkpoints import ModelCache
from dataward.store.ledger import Ledger, ModelRecord
from dataward.training.kinds import KINDS
from dataward.training.planner import Planner


class ServedModels:
    """The models a ward serves at the time of one request: per kind the served record of each compartment
    (:meth:`served`), their models (checksummed, cached across requests in ``cache``; ``on_load`` sees every use),
    soups, stacked and guarded denoisers, and the latent codec."""

    def __init__(self, planner: Planner, cache: ModelCache, on_load: Callable[[ModelRecord], None] | None = None):
        self.planner = planner
        self.cache = cache
        self.on_load = on_load
        self.path: Path = planner.path
        self.config: WardConfig = planner.config
        self.ledger: Ledger = planner.ledger
        self.scheduler: DDPMScheduler = planner.context.scheduler
        self.records: dict[str, dict[int | None, ModelRecord]] = {}  # kind -> served records, read once per request

    def served(self, kind: str = "denoiser") -> dict[int | None, ModelRecord]:
        """Per compartment (None for a ward-wide model such as the router), the newest ready stage that saw no forgotten
        ID, as read at this request's first ask for ``kind``."""
        if kind not in self.records:
            self.records[kind] = self.planner.served(kind)
        return self.records[kind]

    def compartments(self) -> list[int]:
        """All compartment IDs."""
        return self.ledger.compartments()

    def model_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoisers see: the images, or the autoencoder's latents."""
        return self.config.model_shape()

    def is_fallback(self, record: ModelRecord) -> bool:
        """Whether a served model is an earlier stage's checkpoint (its lineage is retraining after a forget)."""
        return self.planner.is_fallback(record)

    def model(self, record: ModelRecord) -> torch.nn.Module:
        """The model of a ledger record, in eval mode, loaded once (its files checked against their recorded hashes) and
        then taken from the cache; ``on_load`` sees every call."""
        if self.on_load is not None:
            self.on_load(record)
        return self.cache.get(record, self.load)

    def load(self, record: ModelRecord, folder: Path) -> torch.nn.Module:
        """A checkpoint folder's model: its kind's diffusers class, or (a LoRA compartment) the base with its adapter merged."""
        if "lora_rank" not in record.metadata:
            return KINDS[record.kind].model_class.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False)
        base = self.served("public-denoiser").get(None)
        if base is None or base.metadata["weights_sha256"] != record.metadata["base_sha256"]:
            raise DatawardError(f"the adapter in {folder} was trained on another base than this ward's: run `dataward train {self.path}`")
        return load_merged(self.model(base), folder, record.metadata["lora_rank"])

    def soup(self, records: list[ModelRecord], shares: list[float]) -> torch.nn.Module:
        """One model averaging the given served models' weights by ``shares`` (``--weights soup``), made once per set."""
        if self.config.base is None:
            raise DatawardError("soup averages compartments fine-tuned from one base, and this ward has none (its compartments "
                                "trained from random weights, so their average is noise): sample with --weights density or router")
        models = [self.model(r) for r in records]  # every use passes through model(): the service's hook sees each
        return self.cache.derived("soup", tuple(r.id for r in records), lambda: average_models(models, shares))

    def stacked(self, records: list[ModelRecord]) -> StackedDenoisers:
        """The given served denoisers evaluated in one vectorized call (a mixture's batched path), made once per set."""
        models = [self.model(r) for r in records]
        return self.cache.derived("stack", tuple(r.id for r in records), lambda: StackedDenoisers(models))

    def denoiser(self, compartment: int, guard: bool = False, guard_scale: float | None = None, guard_alpha: float | None = None,
                 guard_activity: GuardActivity | None = None) -> Denoiser:
        """The served ε callable of one compartment (optionally guided by its guard, counting its checks in ``guard_activity``)."""
        served = self.served()
        if compartment not in served:
            raise DatawardError(f"compartment {compartment} has no servable model (known: {sorted(served)})")
        eps = unet_eps(self.model(served[compartment]))
        if not guard:
            return eps
        guards = self.served("guard")
        if compartment not in guards:
            raise DatawardError(f"compartment {compartment} has no trained guard: run `dataward guard {self.path}`")
        settings = self.config.guard_settings
        guidance = guard_guidance(self.model(guards[compartment]), settings.scale if guard_scale is None else guard_scale,
                                  settings.alpha if guard_alpha is None else guard_alpha, settings.max_timestep, guard_activity)
        return guarded(eps, guidance, self.scheduler.alphas_cumprod)

    def codec(self) -> LatentCodec:
        """The served public autoencoder of a latent ward, with its scaling factor."""
        if not self.config.latent:
            raise DatawardError("this ward works in pixel space: it has no autoencoder (pretrain with --latent for one)")
        record = self.served("autoencoder").get(None)
        if record is None:
            raise DatawardError(f"this latent ward has no trained autoencoder: run `dataward pretrain {self.path} --latent`")
        autoencoder = self.model(record)
        return self.cache.derived("codec", (record.id,), lambda: LatentCodec(autoencoder, float(record.metadata["scaling_factor"]),
                                                                            self.config.autoencoder))

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] as the models see them: unchanged, or encoded to scaled latents."""
        return self.codec().encode(images) if self.config.latent else images

    def model_data(self, data: Dataset) -> Dataset:
        """A dataset as the models see it (the same IDs and labels; latents in a latent ward)."""
        return self.codec().encode_dataset(data) if self.config.latent else data
