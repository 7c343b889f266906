"""Networks: the denoiser presets (diffusers ``UNet2DModel``), a time-conditioned classifier on noisy inputs, and the
public autoencoder of latent wards (diffusers ``AutoencoderKL``).

The classifier serves as the compartment router (targets: compartment index) and as the CPSample guard
(targets: random bits). All are diffusers models, so every checkpoint is a folder that ``from_pretrained`` loads.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from diffusers import AutoencoderKL, ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D

from dataward.config import AutoencoderConfig
from dataward.errors import DatawardError

Preset = Literal["tiny", "small", "base"]

# Each preset: UNet2DModel keyword arguments. ``tiny`` (~0.7M parameters) is the CPU model for 8x8 digits.
UNET_PRESETS: dict[str, dict] = {
    "tiny": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=32,
    ),
    "small": dict(
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=32,
    ),
    "base": dict(
        block_out_channels=(128, 256, 256, 512),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=64,
    ),
}


def derive_seed(*parts) -> int:
    """A 63-bit seed derived from any parts (seed, model kind, compartment, stage): independent streams per job."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_init(build, seed: int):
    """Build a module with its initial weights drawn from ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_unet(preset: str, image_size: int, channels: int, num_classes: int | None, seed: int) -> UNet2DModel:
    """A denoiser from a preset; class-conditional (a class embedding) when ``num_classes`` is given."""
    if preset not in UNET_PRESETS:
        raise DatawardError(f"unknown model preset {preset!r}: expected one of {', '.join(UNET_PRESETS)}")
    levels = len(UNET_PRESETS[preset]["block_out_channels"]) - 1
    if image_size % (2**levels):
        raise DatawardError(f"image size {image_size} is not divisible by {2**levels}, as preset {preset!r} needs")
    return seeded_init(
        lambda: UNet2DModel(
            sample_size=image_size,
            in_channels=channels,
            out_channels=channels,
            num_class_embeds=num_classes,
            **UNET_PRESETS[preset],
        ),
        seed,
    )


class NoisyClassifier(ModelMixin, ConfigMixin):
    """p(class | x_t, t): a small ResNet encoder with a timestep embedding. Returns logits (N, num_classes)."""

    @register_to_config
    def __init__(self, in_channels: int = 1, num_classes: int = 2, width: int = 64, levels: int = 2, blocks_per_level: int = 1):
        super().__init__()
        temb = width * 4
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, temb)
        self.conv_in = torch.nn.Conv2d(in_channels, width, 3, padding=1)
        blocks = []
        channels = width
        for level in range(levels):
            out = width * (2 ** min(level, 1))
            for _ in range(blocks_per_level):
                blocks.append(ResnetBlock2D(in_channels=channels, out_channels=out, temb_channels=temb, groups=16))
                channels = out
            if level < levels - 1:
                blocks.append(torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1))  # downsample
        self.blocks = torch.nn.ModuleList(blocks)
        self.norm = torch.nn.GroupNorm(16, channels)
        self.head = torch.nn.Linear(channels, num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        emb = self.time_embedding(self.time_proj(t).to(x_t.dtype))
        h = self.conv_in(x_t)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResnetBlock2D) else block(h)
        h = torch.nn.functional.silu(self.norm(h)).mean(dim=(2, 3))  # (N, C)
        return self.head(h)


def build_classifier(in_channels: int, num_classes: int, seed: int, width: int = 64, levels: int = 2, blocks_per_level: int = 1) -> NoisyClassifier:
    """A noisy-input classifier with weights drawn from ``seed``."""
    return seeded_init(
        lambda: NoisyClassifier(in_channels=in_channels, num_classes=num_classes, width=width, levels=levels, blocks_per_level=blocks_per_level), seed
    )


def build_autoencoder(config: AutoencoderConfig, seed: int) -> AutoencoderKL:
    """An ``AutoencoderKL`` with weights drawn from ``seed``."""
    levels = len(config.block_out_channels)
    if config.image_size % 2 ** (levels - 1):
        raise DatawardError(f"autoencoder image_size {config.image_size} is not divisible by {2 ** (levels - 1)}")
    return seeded_init(
        lambda: AutoencoderKL(
            in_channels=config.channels,
            out_channels=config.channels,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels,
            norm_num_groups=config.norm_num_groups,
            sample_size=config.image_size,
            mid_block_add_attention=False,
        ),
        seed,
    )
