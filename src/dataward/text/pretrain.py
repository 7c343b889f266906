"""Pretraining the tiny Stable-Diffusion stack (:mod:`dataward.text.stack`) on public captioned images, with no
download: first the autoencoder on the images (the latent wards' loss and trainer: :func:`dataward.diffusion.latent.autoencoder_loss`,
:func:`dataward.training.loop.run_steps`), then the text encoder and the UNet together on the frozen autoencoder's scaled
latents, with ε-prediction and caption dropout (a share of captions replaced by the empty prompt, so the same network
gives the unconditional ε that classifier-free guidance needs). Both stages run in the one training loop with its EMA,
from generators seeded by (seed, stage): the same data, configs and seed give the same bytes.

:func:`colour_gap` measures whether captions steer the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from dataward.config import TrainConfig
from dataward.data import Dataset
from dataward.diffusion.latent import LatentCodec, autoencoder_loss, latent_scaling_factor
from dataward.errors import DatawardError
from dataward.models.nets import derive_seed
from dataward.text.stack import StackConfig, assemble, build_stack
from dataward.training.loop import PerSampleLoss, TrainState, run_steps


@dataclass(frozen=True)
class PretrainConfig:
    """How the tiny base is pretrained. Saved as JSON (``asdict``) next to what it trains."""

    autoencoder: TrainConfig = TrainConfig(steps=600, batch_size=32, lr=3e-3, ema_decay=0.99)  # the autoencoder's stage
    denoiser: TrainConfig = TrainConfig(steps=1500, batch_size=32, lr=1e-3, ema_decay=0.995)  # text encoder + UNet
    kl_weight: float = 1e-4  # β of the autoencoder's KL term per latent dimension
    caption_dropout: float = 0.1  # share of captions replaced by "" (the unconditional prompt of guidance)


class TextDenoiser(torch.nn.Module):
    """The text encoder and the UNet as one trainable module: ``eps(z_t, t, token_ids)``."""

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """ε predicted for latents (B, C', h, w) at timesteps (B,) given prompts as token IDs (B, L)."""
        return self.unet(z_t, t, encoder_hidden_states=self.text_encoder(token_ids)[0]).sample


def text_denoiser_loss(scheduler: DDPMScheduler, empty_ids: torch.Tensor, caption_dropout: float) -> PerSampleLoss:
    """ε-prediction loss per example; the loop's ``targets`` are the captions' token IDs (B, L), each replaced by the
    empty prompt's ``empty_ids`` (L,) with probability ``caption_dropout`` (drawn from the same generator)."""

    def loss(model, z0, y, token_ids, generator):
        noise = torch.randn(z0.shape, generator=generator, dtype=z0.dtype)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=generator)
        dropped = torch.rand(z0.shape[0], generator=generator) < caption_dropout
        ids = torch.where(dropped[:, None], empty_ids[None], token_ids)
        pred = model(scheduler.add_noise(z0, noise, t), t, ids)
        return (pred - noise).pow(2).flatten(1).mean(dim=1)

    return loss


def _token_ids(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Prompts as token IDs (N, L), padded and truncated to the tokenizer's length as the pipeline encodes them."""
    tokenizer = pipe.tokenizer
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def pretrain_stack(data: Dataset, config: StackConfig, pretrain: PretrainConfig, seed: int, tokenizer_folder: str | Path) -> StableDiffusionPipeline:
    """The tiny stack trained on ``data`` (public captioned RGB images at ``config.image_size``): autoencoder, then text
    encoder + UNet on its latents. The pipeline's VAE carries the latents' ``scaling_factor``."""
    if data.captions is None:
        raise DatawardError("pretraining a text-to-image base needs captioned data (a metadata.jsonl folder or captioned-shapes)")
    if data.shape != (3, config.image_size, config.image_size):
        raise DatawardError(f"the stack takes 3x{config.image_size}x{config.image_size} images, got {'x'.join(map(str, data.shape))}")
    pipe = build_stack(config, seed, tokenizer_folder)
    ae_config = config.autoencoder()
    ae_state = TrainState.fresh(pipe.vae, pretrain.autoencoder)
    run_steps(ae_state, data, autoencoder_loss(pretrain.kl_weight), pretrain.autoencoder.steps, pretrain.autoencoder,
              torch.Generator().manual_seed(derive_seed(seed, "text-stack", "vae", "train")))
    vae = ae_state.ema_model()
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, ae_config, data))
    latents = LatentCodec(vae, vae.config.scaling_factor, ae_config).encode_dataset(data)  # (N, C', h, w), same order
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    state = TrainState.fresh(TextDenoiser(pipe.unet, pipe.text_encoder), pretrain.denoiser)
    loss = text_denoiser_loss(scheduler, _token_ids(pipe, [""])[0], pretrain.caption_dropout)
    run_steps(state, latents, loss, pretrain.denoiser.steps, pretrain.denoiser,
              torch.Generator().manual_seed(derive_seed(seed, "text-stack", "denoiser", "train")), targets=_token_ids(pipe, list(data.captions)))
    trained = state.ema_model()
    result = assemble(vae, trained.text_encoder, pipe.tokenizer, trained.unet, pipe.scheduler)
    result.set_progress_bar_config(disable=True)
    return result


@torch.no_grad()
def colour_gap(pipe: StableDiffusionPipeline, first: str = "red", second: str = "blue", n: int = 8, steps: int = 20,
               guidance_scale: float = 3.0, seed: int = 0) -> float:
    """How much the colour word steers: mean (R − B) of ``n`` samples for "a large FIRST square in the centre on a grey
    background" minus that of ``n`` samples for SECOND, same seed, pixels in [0, 1]. Red vs blue: > 0 when captions
    steer, about 0 when they do not."""

    def red_minus_blue(colour: str) -> float:
        prompt = f"a large {colour} square in the centre on a grey background"
        images = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=torch.Generator().manual_seed(seed), output_type="pt").images  # (n, 3, H, W) in [0, 1]
        return float((images[:, 0] - images[:, 2]).mean())

    return red_minus_blue(first) - red_minus_blue(second)
