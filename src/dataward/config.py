"""Every config of a ward, at the bottom of the module map (nothing here imports a higher module): one frozen dataclass
per component (:class:`TrainConfig`, :class:`DPConfig`, :class:`GuardConfig`, :class:`AutoencoderConfig`), the
ward-level choices (:data:`BaseKind`, :class:`Adapter`, :data:`WeightsName`, :data:`SamplerName`, :data:`AssignBy`),
and :class:`WardConfig`, which holds them all and is saved as ``WARD/ward.json``. Each is parsed here, once; every
other module imports them from here."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from dataward.errors import DatawardError
from dataward.numerics import Numerics

AssignBy = Literal["random", "label", "source"]
CONFIG_FILE = "ward.json"
WeightsName = Literal["router", "density", "soup"]  # soup: one averaged model, not a mixture (dataward.sampling.soups.average_models)
SamplerName = Literal["ddim", "ddpm"]  # the sampling scheduler: DDIM (deterministic, few steps) or DDPM (ancestral)
BaseKind = Literal["public", "imported"]  # the kinds of a ward's base (WardConfig.base; None: no base)
Trainable = Literal["attention", "embedding", "full", "lora"]  # the parameters DP-SGD trains (DPConfig.trainable)
AccountantName = Literal["prv", "rdp"]
GradSampleMode = Literal["hooks", "functorch"]
TRAINABLE_CHOICES: tuple[Trainable, ...] = get_args(Trainable)
ACCOUNTANT_CHOICES: tuple[AccountantName, ...] = get_args(AccountantName)
GRAD_SAMPLE_CHOICES: tuple[GradSampleMode, ...] = get_args(GradSampleMode)


CACHE_ENV = "DATAWARD_CACHE"  # the user's cache folder (default: $XDG_CACHE_HOME/dataward, else ~/.cache/dataward)


def cache_root() -> Path:
    """The user's dataward cache folder (public bases, data sets, feature networks): ``$DATAWARD_CACHE``, else
    ``$XDG_CACHE_HOME/dataward``, else ``~/.cache/dataward``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "dataward"

@dataclass(frozen=True)
class Adapter:
    """What a compartment trains on top of the ward's base, parsed from its text form in ward.json: ``full`` (every
    weight) or ``lora:RANK`` (low-rank adapters, :mod:`dataward.models.adapters`)."""

    rank: int | None = None  # the LoRA rank; None: full fine-tuning

    @classmethod
    def parse(cls, text: str) -> "Adapter":
        """The one parser of ``full`` | ``lora:RANK`` (RANK >= 1), naming the text it refuses."""
        rank = text.split(":", 1)[1] if text.startswith("lora:") else None
        if text != "full" and not (rank is not None and rank.isdigit() and int(rank) >= 1):
            raise DatawardError(f"adapter must be full or lora:RANK with a rank >= 1 (e.g. lora:8), got {text!r}")
        return cls(None if rank is None else int(rank))

    def __str__(self) -> str:
        return "full" if self.rank is None else f"lora:{self.rank}"


@dataclass(frozen=True)
class TrainConfig:
    """How one model is trained. Saved as JSON in every checkpoint's metadata."""

    epochs: float = 200.0  # passes over the model's data (the explicit compute budget, comparable across K)
    steps: int | None = None  # if set, overrides epochs: optimizer steps over all stages
    batch_size: int = 128  # examples per optimizer step
    lr: float = 2e-3  # Adam learning rate
    ema_decay: float = 0.995  # EMA of weights used for sampling (warm-up: min(decay, (1+n)/(10+n)))
    threads: int = 2  # torch intra-op threads; part of the determinism contract

    def batch_for(self, n_examples: int) -> int:
        """The batch actually drawn from ``n_examples``: ``batch_size``, or all of them when there are fewer."""
        return max(1, min(self.batch_size, n_examples))

    def epoch_steps(self, epochs: float, n_examples: int) -> int:
        """Optimizer steps that make ``epochs`` passes over ``n_examples`` at the batch actually drawn (at least 1)."""
        return max(1, math.ceil(epochs * n_examples / self.batch_for(n_examples)))

    def total_steps(self, n_examples: int) -> int:
        """Optimizer steps over all stages for a model trained on ``n_examples``."""
        if self.steps is not None:
            return self.steps
        return self.epoch_steps(self.epochs, n_examples)


def check_guidance(scale: float, alpha: float) -> None:
    """Refuse a guidance scale s < 0 or a threshold α outside (0, 0.5) (the one check, for configs and calls alike)."""
    if scale < 0:
        raise DatawardError(f"guard scale must be >= 0, got {scale}")
    if not 0.0 < alpha < 0.5:
        raise DatawardError(f"guard alpha must be in (0, 0.5), got {alpha}")


@dataclass(frozen=True)
class GuardConfig:
    """How a guard is built, trained and applied. Saved as JSON next to the guard's weights."""

    width: int = 64  # classifier base channels (NoisyClassifier width): enough to memorise the random bits of 64 digits at t < 300 (~0.9 at t = 500)
    levels: int = 2  # resolution levels of the classifier (8x8 -> 4x4)
    blocks_per_level: int = 1  # ResNet blocks per level
    epochs: float = 500.0  # passes over the guard's data (used when ``steps`` is None); 500 steps for 64 images
    steps: int | None = None  # if set, overrides epochs: optimizer steps over all stages
    batch_size: int = 64  # examples per optimizer step
    lr: float = 1e-3  # Adam learning rate
    ema_decay: float = 0.99  # EMA of the guard's weights; the EMA weights are the ones that guide sampling
    max_timestep: int = 600  # the guard trains on t in [0, max_timestep) and guides only there (of T = 1000)
    scale: float = 30.0  # default guidance scale s (BENCHMARKS.md, guarded sampling: the calibrated guard's replication / FD trade-off)
    alpha: float = 0.1  # default threshold α: guide where max_y p(y | x_t) > 1 − α (a calibrated guard is rarely that sure off its members)
    nonmember_weight: float = 1.0  # weight of the calibration term on non-member images (0: the paper's guard, confident far from its members)
    nonmembers: str = "printed:count=1200"  # public non-member images: all but the last CONFIDENCE_PROBE train the calibration, those are the status figure
    threads: int = 2  # torch intra-op threads during training (part of the determinism contract)

    def __post_init__(self) -> None:
        if self.width < 16 or self.width % 16:
            raise DatawardError(f"guard width must be a positive multiple of 16 (GroupNorm groups), got {self.width}")
        if self.levels < 1 or self.blocks_per_level < 1:
            raise DatawardError(f"guard levels and blocks_per_level must be >= 1, got {self.levels} and {self.blocks_per_level}")
        if self.max_timestep < 1:
            raise DatawardError(f"guard max_timestep must be >= 1, got {self.max_timestep}")
        check_guidance(self.scale, self.alpha)
        if not (self.nonmember_weight >= 0 and math.isfinite(self.nonmember_weight)):
            raise DatawardError(f"guard nonmember_weight must be a finite number >= 0, got {self.nonmember_weight}")

    def train_config(self) -> TrainConfig:
        """The shared trainer's config for this guard."""
        return TrainConfig(
            epochs=self.epochs, steps=self.steps, batch_size=self.batch_size, lr=self.lr, ema_decay=self.ema_decay, threads=self.threads
        )


@dataclass(frozen=True)
class AutoencoderConfig:
    """A small ``AutoencoderKL`` for 8x8 (or 16x16) grey digits. Saved as JSON next to the weights."""

    image_size: int = 8  # input H = W
    channels: int = 1  # input channels
    latent_channels: int = 4  # C' of the latent (C', H / 2, W / 2): 4x4x4 for 8x8 images
    block_out_channels: tuple[int, ...] = (16, 32)  # encoder/decoder widths; len - 1 downsamplings by 2
    layers_per_block: int = 2  # resnet blocks per level
    norm_num_groups: int = 8  # GroupNorm groups (must divide every width)
    kl_weight: float = 1e-4  # β: weight of the KL to N(0, I) per latent dimension, relative to the pixel MSE
    steps: int = 1000  # Adam steps of pretraining (~50 s on 1 CPU thread)
    batch_size: int = 64  # examples per step
    lr: float = 6e-3  # Adam learning rate

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise DatawardError(f"the autoencoder's steps (--autoencoder-steps) and batch_size must be at least 1, "
                                f"got {self.steps} and {self.batch_size}")

    def latent_shape(self) -> tuple[int, int, int]:
        """(C', h, w) of one latent."""
        side = self.image_size // 2 ** (len(self.block_out_channels) - 1)
        return (self.latent_channels, side, side)

    def train_config(self, threads: int = 2) -> TrainConfig:
        """The trainer settings of autoencoder pretraining (EMA decay 0.99: few steps)."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, ema_decay=0.99, threads=threads)

    @classmethod
    def from_dict(cls, data: dict) -> "AutoencoderConfig":
        """Parse the JSON form (``asdict``), naming any unknown field."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise DatawardError(f"autoencoder config has unknown field(s): {', '.join(sorted(unknown))}")
        return cls(**{**data, "block_out_channels": tuple(data.get("block_out_channels", cls.block_out_channels))})


# Adam learning rates of DP-SGD by trainable set, from the sweep in BENCHMARKS.md ("Private fine-tuning"): the few
# attention parameters want large steps (at 2e-3 the noise drowns them: CAS 0.65 vs 0.80 at 1e-2), while 1e-2 on the
# whole model is ruinous (0.46 vs 0.76 at 2e-3); the class embedding alone (1,280 numbers) wants 1e-1 (ε = 1: CAS 0.76;
# 0.64 at 1e-2, 0.72 at 4e-1).
DP_LEARNING_RATES: dict[Trainable, float] = {"attention": 1e-2, "embedding": 1e-1, "full": 2e-3, "lora": 1e-2}


@dataclass(frozen=True)
class DPConfig:
    """How a model is trained with DP-SGD. Saved as JSON in the model's metadata (with the
    :class:`~dataward.training.privacy.PrivacyRecord`).

    The EMA decay and thread count come from :class:`TrainConfig`; its ``lr``, ``epochs``,
    ``steps`` and ``batch_size`` are NOT used here: ``lr`` below is DP-SGD's, and ``epochs`` and ``batch`` define the
    sampling the accountant sees.
    """

    epsilon: float = 10.0  # target ε for the whole run; sigma is calibrated so the accountant's ε <= this
    delta: float | None = None  # target δ; None -> 1 / (10 N) for N private examples; must be < 1 / N
    clip: float | None = None  # C: per-sample gradients are clipped to L2 norm <= C (flat, over the trainable parameters);
    # None: the median per-example gradient norm of the starting model on public data (calibrate_clip), 1.0 without any
    batch: int = 256  # expected logical batch under Poisson sampling; q = 1 / ceil(N / batch) (opacus's convention)
    epochs: int = 50  # passes; one pass = ceil(N / batch) logical steps, so steps = epochs * ceil(N / batch)
    trainable: Trainable = "attention"  # attention: the DP-LDM recipe (attention modules + class embedding); embedding: the
    # class embedding only (the least noise: best on small private sets and at small ε); full: all; lora: the compartment's
    # adapter on the ward's base (a ward with adapter="lora:RANK" trains this and only this)
    lr: float | None = None  # Adam learning rate; None: DP_LEARNING_RATES[trainable] (attention 1e-2, embedding 1e-1, full 2e-3)
    accountant: AccountantName = "prv"  # prv (Gopi et al. 2021, tight) or rdp (Mironov 2017, looser upper bound)
    max_physical_batch: int = 128  # logical batches are split into physical ones of at most this size (BatchMemoryManager)
    secure_rng: bool = False  # cryptographically secure sampling and noise (needs torchcsprng); not bitwise reproducible
    grad_sample_mode: GradSampleMode = "hooks"  # per-sample gradients: opacus hooks (+ contiguity fix) or functorch
    noise_multiplicity: int = 1  # K: each example's loss averages K draws of (t, noise) before clipping (DPDM): same ε, K x compute

    def learning_rate(self) -> float:
        """DP-SGD's Adam learning rate: ``lr``, or the default for the trainable set."""
        return self.lr if self.lr is not None else DP_LEARNING_RATES[self.trainable]


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
    # where every compartment's denoiser starts (dataward.public_base): "public" (the public denoiser), "imported" (a diffusers
    # UNet2DModel folder copied into the ward), None (random weights: the wards made before bases existed)
    base: BaseKind | None = None
    adapter: str = "full"  # what a compartment trains on top of the base, as ward.json writes it (read by Adapter.parse): full | lora:RANK
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
        return Adapter.parse(self.adapter).rank

    def is_dp(self, compartment: int) -> bool:
        """Whether a compartment's denoiser trains with DP-SGD."""
        return self.dp is not None and (self.dp_compartments is None or compartment in self.dp_compartments)
