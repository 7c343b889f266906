"""What ``dataward init`` chooses for a data source when the user names no image size, preset, budget or base.

- ``digits`` and every other source: 8 px, the ``tiny`` preset, 200 epochs; ``--base auto`` is the printed-digits base
  for digits (:func:`dataward.public_base.choose_base`) and none otherwise.
- ``mnist`` and ``fashion-mnist`` (issue 31): the choice measured by ``benchmarks/real_model_choice.py`` on
  Fashion-MNIST (subset=10000, K = 1) at equal wall-clock training on 2 cores (BENCHMARKS.md, "Real images
  (MNIST, Fashion-MNIST)"): the pixel UNet at 28 px made 238 steps in 346 s (FD 364, synthetic-trained accuracy
  58.7%); the latent ward from a public MNIST base made 2,609 steps in 374 s (FD 86, 74.2%), and samples 18x faster.
  Without the base (same autoencoder, 349 s): FD 90, 75.1%: the base does not clearly help, but it is kept: a latent
  ward trains the public denoiser anyway (its autoencoder comes with ``public``), and DP fine-tuning starts from it.
  So :func:`real_images`: 30 epochs, 2,344 steps at subset=10000 (~6 min on 2 cores; the whole training split ~34 min),
  plus the public autoencoder (1,500 steps, ~7 min) and base (1,000 steps, ~2.5 min).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dataward.benchmark_data import PACKAGES
from dataward.config import AutoencoderConfig, TrainConfig


@dataclass(frozen=True)
class InitDefaults:
    """The ward settings ``dataward init`` fills in for a data source; ``config_changes`` are set on the new ward."""

    image_size: int  # images are resized to this side
    model: str  # UNet preset
    epochs: float  # training budget per compartment: passes over its data
    config_changes: dict = field(default_factory=dict)  # WardConfig fields set after creation (latent space, public data)
    summary: str = ""  # one line for init's output: what was chosen and why


PLAIN = InitDefaults(image_size=8, model="tiny", epochs=200.0)

# A public autoencoder from 32 px (28 px images, resized) to 8x8x4 latents: the tiny UNet takes 0.115 s per step of 128
# there vs 1.26 s on 28x28 pixels (2 threads), so a latent ward trains 11x the steps in the same time.
REAL_AUTOENCODER = AutoencoderConfig(image_size=32, block_out_channels=(16, 32, 32), latent_channels=4, norm_num_groups=8, steps=1500)

# The public data of each set's (autoencoder, base), never the set itself: for clothes the other benchmark set (MNIST);
# for MNIST pen strokes (any handwriting) and printed digits, as for the 8 px digits
REAL_PUBLIC = {"fashion-mnist": ("mnist", "mnist"), "mnist": ("strokes:count=10000,size=32", "printed:count=3000,size=32")}


def real_images(name: str) -> InitDefaults:
    """The measured default of ``mnist`` / ``fashion-mnist``: a latent ward at 32 px with a public base (module docstring)."""
    autoencoder_data, public = REAL_PUBLIC[name]
    changes = {"latent": True, "autoencoder": REAL_AUTOENCODER, "autoencoder_data": autoencoder_data, "public": public,
               "base": "public", "public_train": TrainConfig(steps=1000)}
    return InitDefaults(image_size=32, model="tiny", epochs=30.0, config_changes=changes,
                        summary=f"latent ward: 32 px images as 8x8x4 latents of a public autoencoder ({autoencoder_data}), "
                                f"from a public base ({public})")


def init_defaults(data: str) -> InitDefaults:
    """The defaults for the data source spec ``data``."""
    name = data.split(":", 1)[0]
    return real_images(name) if name in PACKAGES else PLAIN
