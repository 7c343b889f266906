"""The tiny Stable-Diffusion stack: stock ``AutoencoderKL`` + ``UNet2DConditionModel`` (cross-attention) +
``CLIPTextModel`` + ``CLIPTokenizer`` (:mod:`dataward.text.tokenizer`) + ``DDIMScheduler``, assembled as a diffusers
``StableDiffusionPipeline`` (no safety checker, no feature extractor), the layout users' Stable Diffusion folders have,
at a size a CPU trains in minutes: 32x32 RGB images, 8x8x4 latents.

Every weight is drawn from a seed (:func:`build_stack`); :func:`save_stack` writes the folder with
``save_pretrained(..., safe_serialization=True)`` and :func:`load_stack` reads it back with
``StableDiffusionPipeline.from_pretrained(dir, use_safetensors=True)`` after :func:`dataward.text.basecheck.check_base`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from dataward.config import AutoencoderConfig
from dataward.errors import DatawardError
from dataward.models.nets import build_autoencoder, derive_seed, seeded_init
from dataward.text.basecheck import check_base
from dataward.text.tokenizer import MAX_LENGTH, build_tokenizer


@dataclass(frozen=True)
class StackConfig:
    """The sizes of the tiny Stable-Diffusion stack. Saved as JSON (``asdict``) next to what it builds."""

    image_size: int = 32  # H = W of the images (RGB)
    latent_channels: int = 4  # C' of the latents (C', image_size / 4, image_size / 4)
    vae_widths: tuple[int, ...] = (16, 32, 32)  # AutoencoderKL block widths: len - 1 downsamplings by 2 (32 -> 8)
    unet_widths: tuple[int, ...] = (32, 64)  # UNet2DConditionModel block widths (cross-attention in the first down / last up block)
    text_width: int = 32  # CLIPTextModel hidden size = the UNet's cross_attention_dim
    text_layers: int = 2  # transformer layers of the text encoder
    text_heads: int = 4  # attention heads of the text encoder
    attention_head_dim: int = 8  # channels per head of the UNet's attention
    max_length: int = MAX_LENGTH  # tokens per prompt (the text encoder's positions)

    def autoencoder(self) -> AutoencoderConfig:
        """The autoencoder's config in dataward's terms (built by :func:`dataward.models.nets.build_autoencoder`)."""
        return AutoencoderConfig(image_size=self.image_size, channels=3, latent_channels=self.latent_channels,
                                 block_out_channels=self.vae_widths, layers_per_block=1, norm_num_groups=8)

    def latent_shape(self) -> tuple[int, int, int]:
        """(C', h, w) of one latent."""
        return self.autoencoder().latent_shape()


def noise_scheduler() -> DDIMScheduler:
    """Stable Diffusion's noise schedule (scaled-linear betas 0.00085..0.012 over 1000 steps) as the pipeline's DDIM
    scheduler; training draws x_t with ``DDPMScheduler.from_config`` of the same config."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build_text_encoder(config: StackConfig, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    """A ``CLIPTextModel`` of ``config``'s size over ``tokenizer``'s vocabulary, weights drawn from ``seed``."""
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=2 * config.text_width,
                                 num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                                 max_position_embeddings=config.max_length, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return seeded_init(lambda: CLIPTextModel(text_config), seed)


def build_unet(config: StackConfig, seed: int) -> UNet2DConditionModel:
    """A cross-attention ``UNet2DConditionModel`` over the latents, weights drawn from ``seed``."""
    levels = len(config.unet_widths)
    return seeded_init(lambda: UNet2DConditionModel(
        sample_size=config.latent_shape()[1], in_channels=config.latent_channels, out_channels=config.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (levels - 1),
        up_block_types=("UpBlock2D",) * (levels - 1) + ("CrossAttnUpBlock2D",),
        block_out_channels=tuple(config.unet_widths), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=config.text_width, attention_head_dim=config.attention_head_dim,
    ), seed)


def assemble(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel,
             scheduler: DDIMScheduler) -> StableDiffusionPipeline:
    """The components as a ``StableDiffusionPipeline`` without safety checker or feature extractor."""
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_stack(config: StackConfig, seed: int, tokenizer_folder: str | Path) -> StableDiffusionPipeline:
    """The untrained stack: each network's weights from a seed derived from (``seed``, component); the tokenizer's
    vocabulary is written into ``tokenizer_folder`` (:func:`dataward.text.tokenizer.build_tokenizer`)."""
    if config.image_size % 2 ** (len(config.vae_widths) - 1) or config.latent_shape()[1] % 2 ** (len(config.unet_widths) - 1):
        raise DatawardError(f"image size {config.image_size} does not divide down through the autoencoder {config.vae_widths} "
                            f"and the UNet {config.unet_widths}")
    tokenizer = build_tokenizer(tokenizer_folder, max_length=config.max_length)
    vae = build_autoencoder(config.autoencoder(), derive_seed(seed, "text-stack", "vae"))
    text_encoder = build_text_encoder(config, tokenizer, derive_seed(seed, "text-stack", "text_encoder"))
    unet = build_unet(config, derive_seed(seed, "text-stack", "unet"))
    return assemble(vae, text_encoder.eval(), tokenizer, unet.eval(), noise_scheduler())


def save_stack(pipe: StableDiffusionPipeline, folder: str | Path) -> Path:
    """Write the pipeline as a ``save_pretrained`` folder with safetensors weights; returns the folder."""
    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def load_stack(folder: str | Path) -> StableDiffusionPipeline:
    """A pipeline folder, checked first (:func:`dataward.text.basecheck.check_base`: refused by name when it does not
    fit), then loaded from its safetensors files only, with no network."""
    check_base(folder)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, local_files_only=True,
                                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe

