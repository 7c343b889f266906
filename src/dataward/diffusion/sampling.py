"""The one sampling loop, and the denoiser interface every model in dataward speaks.

A denoiser is any callable ``eps(x_t, t, y) -> Tensor`` predicting the noise in ``x_t`` (N, C, H, W) at integer
timestep ``t``, with class labels ``y`` (N,) or None. Composition over compartments, guard guidance and latent decoding
are wrappers that return the same kind of callable, so this loop never knows about them.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dataward.config import SamplerName


class Denoiser(Protocol):
    """Predicts the noise: ``eps(x_t, t, y) -> (N, C, H, W)``."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor: ...


# A guidance callable returns grad_x log p(c | x_t) (N, C, H, W) for whatever condition c it steers toward.
Guidance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def unet_eps(model: torch.nn.Module) -> Denoiser:
    """A diffusers UNet (``model(x_t, t, class_labels=y).sample``) as a denoiser callable ``eps(x_t, t, y)``; a scalar
    ``t`` is broadcast to the batch."""

    def eps(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        return model(x_t, t, class_labels=y).sample

    return eps


def make_training_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2") -> DDPMScheduler:
    """The forward process shared by the denoiser, the router and the guards (``add_noise``). ``timestep_spacing`` is
    DDPM's and DDIM's default, named so that ``from_config`` hands it to every other scheduler: the squaredcos schedule's
    ᾱ at t = T − 1 is ~2.4e-9, and schedulers that default to linspace or trailing spacing start there, where the model's
    small ε error becomes a huge x_0 error (:mod:`dataward.sampling.pipeline`)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type="epsilon", clip_sample=True,
                         timestep_spacing="leading")


def make_sampler(training_scheduler: DDPMScheduler, sampler: SamplerName) -> DDPMScheduler | DDIMScheduler:
    """A sampling scheduler with the same noise schedule as ``training_scheduler``."""
    if sampler == "ddpm":
        return DDPMScheduler.from_config(training_scheduler.config)
    if sampler == "ddim":
        return DDIMScheduler.from_config(training_scheduler.config)
    raise ValueError(f"unknown sampler {sampler!r}: expected ddim or ddpm")


def guide_eps(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, guidance: Guidance, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Classifier guidance in ε-space (guided-diffusion ``condition_score``): ε̂ = ε − sqrt(1 − ᾱ_t) ∇ log p."""
    sigma = (1.0 - alpha_bar[int(t)]).sqrt()
    return eps - sigma * guidance(x_t, t)


def sample_loop(
    eps: Denoiser,
    x_T: torch.Tensor,
    scheduler: DDPMScheduler | DDIMScheduler,
    *,
    steps: int,
    y: torch.Tensor | None = None,
    guidance: Guidance | None = None,
    generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``x_T`` (N, C, H, W) for ``steps`` steps; returns x_0 (N, C, H, W)."""
    scheduler.set_timesteps(steps)
    alpha_bar = scheduler.alphas_cumprod
    x = x_T * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            e = eps(x, t, y)
        if guidance is not None:
            e = guide_eps(e, x, t, guidance, alpha_bar)
        x = scheduler.step(e, t, x, generator=generator).prev_sample
        if progress is not None:
            progress(i + 1)
    return x
