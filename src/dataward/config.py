"""A ward's configuration: :class:`WardConfig`, saved as ``WARD/ward.json``."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from dataward.diffusion.compose import WeightsName
from dataward.diffusion.latent import AutoencoderConfig
from dataward.errors import DatawardError
from dataward.models.guard import GuardConfig
from dataward.numerics import Numerics
from dataward.training.loop import TrainConfig
from dataward.training.privacy import DPConfig

AssignBy = Literal["random", "label", "source"]
CONFIG_FILE = "ward.json"


@dataclass(frozen=True)
class WardConfig:
    """Everything that defines a ward's models. Saved as ward.json; changing it means a new ward."""

    data: str  # the data source spec the ward was created from
    model: str = "tiny"  # UNet preset: tiny (8x8, CPU) | small (16-32 px) | base (64 px, GPU)
    image_size: int = 8  # images are resized to image_size x image_size
    channels: int = 1  # 1 grey or 3 RGB
    num_classes: int | None = 10  # class-conditional denoiser when not None
    seed: int = 0  # the root of every seed in the ward
    slices: int = 1  # SISA slices per compartment: forgetting retrains from the slice that held the ID
    by: AssignBy = "random"  # how samples are assigned to compartments
    compartments: int = 1  # how many compartments init made: a record only (add makes more; the ledger lists them all)
    weights: WeightsName = "density"  # default composition weights for sampling
    router: bool = True  # train the joint router (p(compartment | x_t, t)) when there are several compartments
    guard: bool = False  # train a CPSample guard per compartment
    guard_settings: GuardConfig = field(default_factory=GuardConfig)  # guard classifier, its training and guidance defaults
    train: TrainConfig = field(default_factory=TrainConfig)  # denoiser training
    public: str | None = None  # public data spec of the public pretrained denoiser (dataward pretrain); None: none
    # where every compartment's denoiser starts (dataward.base): "public" (the public denoiser), "imported" (a diffusers
    # UNet2DModel folder copied into the ward), None (random weights: the wards made before bases existed)
    base: str | None = None
    adapter: str = "full"  # what a compartment trains on top of the base: full (every weight) | lora:RANK (low-rank adapters)
    public_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40.0))  # public pretraining budget
    latent: bool = False  # latent diffusion (dataward pretrain --latent): every denoiser, router and guard works on the latents of a public autoencoder
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)  # the public autoencoder of a latent ward
    autoencoder_data: str = "strokes:count=10000"  # public data spec the autoencoder trains on (pen strokes: any handwriting)
    dp: DPConfig | None = None  # DP-SGD fine-tuning of the compartments' denoisers (dataward train --dp); None: no DP
    dp_compartments: tuple[int, ...] | None = None  # which compartments train with DP (None: all)
    router_train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30.0, lr=1e-3))  # router training
    num_train_timesteps: int = 1000  # forward process length
    beta_schedule: str = "squaredcos_cap_v2"  # diffusers beta schedule name
    numerics: Numerics = "portable"  # CPU kernels: portable (the same bytes on every AVX2 machine) | native (see dataward.numerics)

    @classmethod
    def from_json(cls, data: dict) -> "WardConfig":
        """Parse ward.json, naming any unknown field."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise DatawardError(f"ward.json has unknown field(s): {', '.join(sorted(unknown))}")
        data = dict(data)
        for key in ("train", "router_train", "public_train"):
            if key in data:
                data[key] = TrainConfig(**data[key])
        if data.get("dp") is not None:
            data["dp"] = DPConfig(**data["dp"])
        if data.get("dp_compartments") is not None:
            data["dp_compartments"] = tuple(data["dp_compartments"])
        if "guard_settings" in data:
            # guards saved before calibration existed trained without it: keep their recipe (issue 17)
            data["guard_settings"] = GuardConfig(**{"nonmember_weight": 0.0, **data["guard_settings"]})
        if "autoencoder" in data:
            data["autoencoder"] = AutoencoderConfig.from_dict(data["autoencoder"])
        return cls(**data)

    @classmethod
    def load(cls, ward: Path) -> "WardConfig":
        """Read a ward folder's ward.json (an error that says how to make a ward when there is none)."""
        path = Path(ward) / CONFIG_FILE
        if not path.is_file():
            raise DatawardError(f"{ward} is not a ward (no ward.json); create one with `dataward init {ward} --data digits`")
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise DatawardError(f"{path} is not a valid ward config: {error}") from None

    def save(self, ward: Path) -> None:
        """Write ward.json atomically into a ward folder (a ward's writer does it holding the writer lock)."""
        tmp = Path(ward) / (CONFIG_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, Path(ward) / CONFIG_FILE)

    @staticmethod
    def stamp(ward: Path) -> str | None:
        """The SHA-256 of ward.json's bytes (None while there is none): a process that has the ward open compares it at
        each use to re-read a config another process saved (a few KB; a file's times cannot tell two quick saves apart)."""
        try:
            return hashlib.sha256((Path(ward) / CONFIG_FILE).read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def model_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoisers, router and guards see: the images, or the autoencoder's latents."""
        if self.latent:
            return self.autoencoder.latent_shape()
        return (self.channels, self.image_size, self.image_size)

    def lora_rank(self) -> int | None:
        """The rank of the compartments' LoRA adapters (None: full fine-tuning)."""
        return None if self.adapter == "full" else int(self.adapter.split(":", 1)[1])

    def is_dp(self, compartment: int) -> bool:
        """Whether a compartment's denoiser trains with DP-SGD."""
        return self.dp is not None and (self.dp_compartments is None or compartment in self.dp_compartments)
