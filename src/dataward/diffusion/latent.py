"""Latent diffusion (DP-LDM's first half): a small diffusers ``AutoencoderKL`` trained on PUBLIC data (built by
:func:`dataward.models.nets.build_autoencoder`), and the latent denoiser wrapper that lets the one sampling loop run in
its latent space.

The autoencoder is trained with the ordinary trainer (:func:`dataward.training.loop.run_steps`) on an unreduced per-sample
loss (reconstruction + ``kl_weight`` * KL). Encoding uses the posterior mean (deterministic), scaled by a factor computed
from the public latents so they have unit standard deviation (Rombach et al.'s ``scaling_factor``). Latents are not in
[-1, 1], so latent sampling uses a scheduler without x_0 clipping (:func:`make_latent_scheduler`).

Sampling: ``decode(sample_loop(eps_latent, z_T, ...))``. :class:`LatentDenoiser` is just a denoiser over latents that
also knows how to decode; the loop in :mod:`dataward.diffusion.sampling` never knows it runs in latent space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler

import dataward.diffusion.sampling as sampling
from dataward.config import AutoencoderConfig, SamplerName
from dataward.data import Dataset
from dataward.errors import DatawardError


def autoencoder_loss(kl_weight: float):
    """Per-example ``mean (x - D(z))^2 + kl_weight * KL(q(z|x) || N(0, I)) / dim(z)``, z ~ q(z|x) from ``generator``."""

    def loss(model, x0, y, targets, generator):
        posterior = model.encode(x0).latent_dist
        z = posterior.sample(generator=generator)  # (B, C', h, w)
        recon = model.decode(z).sample  # (B, C, H, W)
        kl = posterior.kl() / z[0].numel()  # (B,)
        return (recon - x0).pow(2).flatten(1).mean(dim=1) + kl_weight * kl

    return loss


@dataclass
class LatentCodec:
    """A trained autoencoder and its latent scaling factor: images (N, C, H, W) <-> latents (N, C', h, w)."""

    autoencoder: AutoencoderKL
    scaling_factor: float  # 1 / std of the public latents: scaled latents have unit standard deviation
    config: AutoencoderConfig

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled posterior means (deterministic) of images in [-1, 1]."""
        self.autoencoder.eval()
        return self.autoencoder.encode(images).latent_dist.mode() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""
        self.autoencoder.eval()
        return self.autoencoder.decode(latents / self.scaling_factor).sample.clamp(-1, 1)

    def encode_dataset(self, data: Dataset, batch: int = 512) -> Dataset:
        """The same examples (IDs, labels) as latents: what the latent denoiser trains on. Encoding is a per-example
        deterministic map with a public model, so DP-SGD on the latents is DP for the images."""
        if data.shape != (self.config.channels, self.config.image_size, self.config.image_size):
            raise DatawardError(
                f"the autoencoder takes {self.config.channels}x{self.config.image_size}x{self.config.image_size} images, got {'x'.join(map(str, data.shape))}"
            )
        z = torch.cat([self.encode(data.images[i : i + batch]) for i in range(0, len(data), batch)])
        return Dataset(data.ids, z.contiguous(), data.labels, data.owners, data.num_classes)


def latent_scaling_factor(autoencoder: AutoencoderKL, config: AutoencoderConfig, public: Dataset) -> float:
    """1 / std of the (unscaled) latents of the public images: scaled latents have unit standard deviation."""
    z = LatentCodec(autoencoder, 1.0, config).encode_dataset(public).images
    return float(1.0 / z.std())


# ---------------------------------------------------------------------------------------------------------------------
# Sampling in latent space


def make_latent_scheduler(training_scheduler: DDPMScheduler, sampler: SamplerName = "ddim") -> DDPMScheduler | DDIMScheduler:
    """The sampling scheduler of ``training_scheduler``'s noise schedule without x_0 clipping (latents are unbounded)."""
    scheduler = sampling.make_sampler(training_scheduler, sampler)
    return type(scheduler).from_config(scheduler.config, clip_sample=False)


class LatentDenoiser:
    """A denoiser over scaled latents (N, C', h, w) that also decodes: ``sample_loop`` runs on it unchanged, and
    :meth:`decode` maps its x_0 to images."""

    def __init__(self, eps: sampling.Denoiser, codec: LatentCodec):
        self.eps = eps
        self.codec = codec

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.eps(x_t, t, y)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C', h, w) of one latent: the shape of x_T to draw."""
        return self.codec.config.latent_shape()

    def decode(self, z_0: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] from the loop's output latents."""
        return self.codec.decode(z_0)


def sample_latent(
    denoiser: LatentDenoiser,
    n: int,
    scheduler: DDPMScheduler | DDIMScheduler,
    *,
    steps: int,
    generator: torch.Generator,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """``n`` images: z_T ~ N(0, I) from ``generator``, the one sampling loop in latent space, then decode."""
    z_T = torch.randn((n, *denoiser.latent_shape), generator=generator)  # (N, C', h, w)
    z_0 = sampling.sample_loop(denoiser, z_T, scheduler, steps=steps, y=y, generator=generator)
    return denoiser.decode(z_0)
