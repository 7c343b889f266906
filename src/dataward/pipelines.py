"""A ward as a diffusers pipeline: :class:`WardPipeline` samples a composed, access-restricted ward the way diffusers users
sample any model (``pipe(batch_size=..., generator=...)``), with the ward's guarantees and each sample's attribution.

It plans each call exactly as :meth:`dataward.ward.Ward.sample` does (:func:`dataward.generation.plan_sampling`: the
models served *now*, so a forgotten ID's models and quarantined models are never used, also by a pipeline made before
the forget; a call during which a forget quarantines a model it used raises instead of returning its images) and runs diffusers' own loop shape (``set_timesteps``, ``scale_model_input``, ``step``) under
``self.progress_bar``; with the ward's scheduler and the same seed its images equal ``Ward.sample``'s bit for bit.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin

from dataward.config import WeightsName
from dataward.errors import DatawardError
from dataward.generation import SampleRequest, SamplingPlan, finish_sampling, plan_sampling
from dataward.ward import Ward


@dataclass
class WardPipelineOutput(ImagePipelineOutput):
    """diffusers' image output plus where each sample came from."""

    labels: np.ndarray | None  # (N,) class of each sample (None in an unconditional ward)
    attribution: np.ndarray  # (N, K) trajectory-averaged weight of each of the ward's compartments
    compartments: list[int]  # the compartments that were composed
    models: dict[int, dict]  # compartment -> {"model": id, "stage": r, "fallback": bool}


class WardPipeline(DiffusionPipeline):
    """Sample a ward composed over ``allowed`` compartments (all by default) with ``weights`` (density, router or soup).

    ``scheduler``: any diffusers scheduler with the ward's noise schedule (e.g. ``DPMSolverMultistepScheduler.from_config(
    ward.scheduler.config)``); None uses the ward's own (DDPM for density weights, DDIM otherwise). Density weights
    estimate each compartment's density along DDPM's stochastic steps, so they take a ``DDPMScheduler`` only.
    """

    def __init__(self, ward: Ward, allowed: Sequence[int] | None = None, weights: WeightsName | None = None,
                 top_k: int | None = None, scheduler: SchedulerMixin | None = None):
        super().__init__()
        self.register_modules(scheduler=scheduler)
        self.ward = ward
        self.allowed = None if allowed is None else list(allowed)
        self.weights = weights
        self.top_k = top_k

    def _check_scheduler(self, scheduler: SchedulerMixin) -> None:
        ours, theirs = self.ward.scheduler.alphas_cumprod, getattr(scheduler, "alphas_cumprod", None)
        if theirs is None or theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours.float(), atol=1e-6):
            raise DatawardError(f"{type(scheduler).__name__} has another noise schedule than this ward's: make it with "
                                "`.from_config(pipe.ward.scheduler.config)`")

    def _check_not_forgotten(self, plan: SamplingPlan, routers: dict) -> None:
        """Refuse the images of a call during which a forget quarantined a model it used (its compartments' served
        denoisers, and the router for router weights), as the service re-checks every generation after it ran."""
        used = [plan.served[c] for c in plan.use] + ([routers[None]] if plan.mode == "router" and None in routers else [])
        tainted = set(self.ward.ledger.tainted_models([record.id for record in used]))
        if tainted:
            named = ", ".join(f"model {r.id} ({r.kind}{'' if r.compartment is None else f' of compartment {r.compartment}'})"
                              for r in used if r.id in tainted)
            raise DatawardError(f"a forget quarantined {named} while this call was sampling, so its images were discarded: "
                                "call the pipeline again (the next call uses only the models served now)")

    @classmethod
    def from_ward(cls, path: str | Path, allowed: Sequence[int] | None = None, weights: WeightsName | None = None,
                  top_k: int | None = None, scheduler: SchedulerMixin | None = None) -> "WardPipeline":
        """A pipeline on the ward folder ``path``, opened read-only (it never changes the ward's files)."""
        return cls(Ward.open(path, worker=True), allowed, weights, top_k, scheduler)

    def __call__(self, batch_size: int = 1, class_labels: int | Sequence[int] | None = None, num_inference_steps: int = 50,
                 generator: torch.Generator | None = None, output_type: str = "pil", return_dict: bool = True):
        """Generate ``batch_size`` images: ``class_labels`` one class for all, one per image, or None (drawn from the
        classes the compartments hold); ``generator``: a CPU ``torch.Generator`` (default: seed 0, as ``Ward.sample``);
        ``output_type``: "pil", "np" (N, H, W, C) in [0, 1], or "pt" (N, C, H, W)."""
        if output_type not in ("pil", "np", "pt"):
            raise DatawardError(f"output_type must be pil, np or pt, got {output_type!r}")
        label = tuple(int(c) for c in class_labels) if isinstance(class_labels, Sequence) else class_labels
        request = SampleRequest(batch_size, label, 0, None, num_inference_steps, self.allowed, self.weights, self.top_k)
        routers = self.ward.served("router")  # read before planning: a forget landing in between is caught, never missed
        plan = plan_sampling(self.ward, request, generator)
        scheduler = plan.scheduler if self.scheduler is None else self.scheduler
        if self.scheduler is not None:
            self._check_scheduler(scheduler)
        if plan.mode == "density" and not isinstance(scheduler, DDPMScheduler):
            raise DatawardError(f"density weights need DDPM steps, not {type(scheduler).__name__}: use weights router or soup "
                                "with other schedulers")
        draws = {"generator": plan.generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        scheduler.set_timesteps(num_inference_steps)
        x = plan.x_T * scheduler.init_noise_sigma
        for t in self.progress_bar(scheduler.timesteps):
            with torch.no_grad():  # guards take their own gradient inside the denoiser
                e = plan.eps(scheduler.scale_model_input(x, t), t, plan.y)
            x = scheduler.step(e, t, x, **draws).prev_sample
        self._check_not_forgotten(plan, routers)
        result = finish_sampling(self.ward, plan, x)
        images = result.images
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return WardPipelineOutput(images=images, labels=None if result.labels is None else result.labels.numpy(),
                                  attribution=result.attribution.numpy(), compartments=result.compartments, models=result.models)
