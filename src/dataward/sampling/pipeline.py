"""A ward as a diffusers pipeline: :class:`WardPipeline` samples a composed, access-restricted ward the way diffusers users
sample any model (``pipe(batch_size=..., generator=...)``), with the ward's guarantees and each sample's attribution.

It plans each call exactly as :meth:`dataward.ward.Ward.sample` does (:func:`dataward.sampling.plan.plan_sampling`: the
models served *now*, so a forgotten ID's models and quarantined models are never used, also by a pipeline made before
the forget; a call during which a forget quarantines a model it used raises instead of returning its images) and runs diffusers' own loop shape (``set_timesteps``, ``scale_model_input``, ``step``) under
``self.progress_bar``; with the ward's scheduler and the same seed its images equal ``Ward.sample``'s bit for bit.

Other diffusers schedulers (why the README's ``DPMSolverMultistepScheduler`` gave saturated noise): the ward's noise
schedule (``squaredcos_cap_v2``) ends at ᾱ ≈ 2.4e-9, so a scheduler that starts at t = T − 1 (``timestep_spacing``
linspace or trailing, the default of DPM-Solver, UniPC, DEIS, Euler, Heun, ...) turns the model's small ε error into an
x_0 error of ~sqrt((1 − ᾱ)/ᾱ) ≈ 20,000 there, and none of them clips x_0 as DDPM and DDIM do (``clip_sample``). Two
fixes, both needed for all of them to draw digits: the ward's scheduler config names DDPM's and DDIM's ``leading``
spacing, so ``from_config`` hands it on (:func:`dataward.diffusion.sampling.make_training_scheduler`: the first step is
then at t ≈ 950-980, as DDIM's), and a scheduler that does not clip x_0 itself runs on :class:`ClippedEps`, DDIM's
clipping done on ε (latent wards: at ±:data:`LATENT_X0_BOUND`; DPM-Solver singlestep starts at t = 999 whatever the
spacing, and unclipped it drew latents ~7 off).
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
from dataward.diffusion.latent import make_latent_scheduler
from dataward.diffusion.sampling import Denoiser, make_sampler
from dataward.sampling.plan import SampleRequest, SamplingPlan, finish_sampling, plan_sampling, sampling_weights
from dataward.store.ledger import ModelRecord
from dataward.ward import Ward


@dataclass
class WardPipelineOutput(ImagePipelineOutput):
    """diffusers' image output plus where each sample came from."""

    labels: np.ndarray | None  # (N,) class of each sample (None in an unconditional ward)
    attribution: np.ndarray  # (N, K) trajectory-averaged weight of each of the ward's compartments
    compartments: list[int]  # the compartments that were composed
    models: dict[int, dict]  # compartment -> {"model": id, "stage": r, "fallback": bool}


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor | float) -> float:
    """ᾱ at timestep ``t``, also a fractional one (Euler-type schedulers), interpolated in σ = sqrt((1 − ᾱ)/ᾱ) as those
    schedulers interpolate their σ."""
    sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt().numpy()  # (T,)
    sigma = float(np.interp(float(t), np.arange(len(sigmas)), sigmas))
    return 1.0 / (1.0 + sigma ** 2)


LATENT_X0_BOUND = 6.0  # a latent ward's x_0 bound for other schedulers: 6 standard deviations of the unit-std latents


class ClippedEps:
    """A denoiser whose implied x_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t) is clipped to [-bound, bound] ([-1, 1]: pixel
    data; :data:`LATENT_X0_BOUND`: latents, where it only stops absurd x_0 near t = T − 1, as DPM-Solver singlestep's
    first step at t = 999 made), returned as the ε of the clipped x_0: what DDPM's and DDIM's ``clip_sample`` do inside
    ``step``, done where any scheduler sees it."""

    def __init__(self, eps: Denoiser, alphas_cumprod: torch.Tensor, bound: float = 1.0):
        self.eps = eps
        self.alphas_cumprod = alphas_cumprod
        self.bound = bound

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        e = self.eps(x_t, t, y)
        alpha_bar = alpha_bar_at(self.alphas_cumprod, t)
        a, s = alpha_bar ** 0.5, (1.0 - alpha_bar) ** 0.5
        x0 = ((x_t - s * e) / a).clamp(-self.bound, self.bound)
        return (x_t - a * x0) / s


def clips_x0(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler`` bounds its x_0 prediction itself (``clip_sample`` or ``thresholding`` in its own options;
    ``from_config`` keeps options a class does not take in its config, so those are looked up in its signature)."""
    takes = inspect.signature(type(scheduler).__init__).parameters
    return any(name in takes and bool(scheduler.config.get(name)) for name in ("clip_sample", "thresholding"))


def scheduler_loop(eps: Denoiser, x_T: torch.Tensor, scheduler: SchedulerMixin, steps: int, y: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, progress_bar=lambda timesteps: timesteps) -> torch.Tensor:
    """diffusers' loop shape (``set_timesteps``, ``scale_model_input``, ``step``) from ``x_T`` (N, C, H, W) over any
    scheduler; returns x_0. ``generator`` feeds the schedulers that draw noise."""
    draws = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in progress_bar(scheduler.timesteps):
        with torch.no_grad():  # guards take their own gradient inside the denoiser
            e = eps(scheduler.scale_model_input(x, t), t, y)
        x = scheduler.step(e, t, x, **draws).prev_sample
    return x


class WardPipeline(DiffusionPipeline):
    """Sample a ward composed over ``allowed`` compartments (all by default) with ``weights`` (density, router or soup).

    ``scheduler``: any diffusers ε-prediction scheduler with the ward's noise schedule (e.g.
    ``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``); None uses the ward's own, which ``pipe.scheduler``
    then shows (DDPM for density weights over several compartments, DDIM otherwise; each call uses the very sampler
    ``Ward.sample`` would). Density weights estimate each compartment's density along DDPM's stochastic steps, so they
    take a ``DDPMScheduler`` only.
    """

    def __init__(self, ward: Ward, allowed: Sequence[int] | None = None, weights: WeightsName | None = None,
                 top_k: int | None = None, scheduler: SchedulerMixin | None = None):
        super().__init__()
        self.ward = ward
        self.allowed = None if allowed is None else list(allowed)
        self.weights = weights
        self.top_k = top_k
        models = ward.read()
        known = models.compartments()
        use = known if allowed is None else sorted(set(allowed))
        several = len([c for c in use if c in models.served()]) > 1  # one compartment samples alone, without a mixture
        sampler = "ddpm" if sampling_weights(weights, ward.config.weights, use, known) == "density" and several else "ddim"
        self.wards_own = (make_latent_scheduler if ward.config.latent else make_sampler)(ward.scheduler, sampler)
        self.register_modules(scheduler=self.wards_own if scheduler is None else scheduler)

    def _check_scheduler(self, scheduler: SchedulerMixin) -> None:
        ours, theirs = self.ward.scheduler.alphas_cumprod, getattr(scheduler, "alphas_cumprod", None)
        if theirs is None or theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours.float(), atol=1e-6):
            raise DatawardError(f"{type(scheduler).__name__} has another noise schedule than this ward's: make it with "
                                "`.from_config(pipe.scheduler.config)`")

    def _check_not_forgotten(self, plan: SamplingPlan, routers: dict[int | None, ModelRecord]) -> None:
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
        models = self.ward.read()  # the models served now: every part of this call uses the same records
        routers = models.served("router")
        plan = plan_sampling(models, request, generator)
        own = self.scheduler is self.wards_own or self.scheduler is None
        scheduler = plan.scheduler if own else self.scheduler
        if not own:
            self._check_scheduler(scheduler)
        if plan.mode == "density" and not isinstance(scheduler, DDPMScheduler):
            raise DatawardError(f"density weights need DDPM steps, not {type(scheduler).__name__}: use weights router or soup "
                                "with other schedulers")
        bound = LATENT_X0_BOUND if self.ward.config.latent else 1.0
        eps = plan.eps if own or clips_x0(scheduler) else ClippedEps(plan.eps, self.ward.scheduler.alphas_cumprod, bound)
        x = scheduler_loop(eps, plan.x_T, scheduler, num_inference_steps, plan.y, plan.generator, self.progress_bar)
        self._check_not_forgotten(plan, routers)
        result = finish_sampling(models, plan, x)
        images = result.images
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return WardPipelineOutput(images=images, labels=None if result.labels is None else result.labels.numpy(),
                                  attribution=result.attribution.numpy(), compartments=result.compartments, models=result.models)
