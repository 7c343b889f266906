"""The ward: a directory holding one protected model family, and the Python API the CLI and the service wrap.

Layout::

    WARD/ward.json          WardConfig (JSON)
    WARD/ledger.sqlite      samples (with their images), models, forget requests, keys, events
    WARD/models/<name>/     one diffusers folder per trained stage: config.json + safetensors weights (EMA),
                            train_state.safetensors (raw weights, EMA, Adam: resumes exactly) and dataward.json

Every model is trained in SISA *stages*: stage r of a lineage (one kind of model for one compartment) trains on slices
0..r, continuing from stage r-1. A lineage is brought up to date by :meth:`Ward.train`: each stage whose expected IDs hash
has no ready checkpoint is retrained from the last stage that still matches. Forgetting, resuming after a crash, adding
a compartment and first training are all that one routine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DModel
from safetensors.torch import load_file

import dataward
from dataward.diffusion.compose import ComposedDenoiser, WeightsName
from dataward.data import Dataset, ids_hash, load_source
from dataward import numerics
from dataward.errors import DatawardError
from dataward.models.guard import (
    ACCURACY_TIMESTEPS, GuardActivity, GuardConfig, build_guard, guard_accuracy_by_t, guard_guidance, guard_labels, guard_loss, guard_model, guarded,
)
from dataward.diffusion.latent import AutoencoderConfig, LatentCodec, LatentDenoiser, autoencoder_loss, build_autoencoder, latent_scaling_factor, make_latent_scheduler
from dataward.store.ledger import Ledger, ModelRecord
from dataward.training.dp import dp_finetune
from dataward.training.privacy import DPConfig, other_accountant, ward_delta, ward_epsilon
from dataward.numerics import Numerics
from dataward.models.nets import NoisyClassifier, build_classifier, build_unet, derive_seed
from dataward.diffusion.sampling import Denoiser, make_sampler, make_training_scheduler, sample_loop, unet_eps
from dataward.training.loop import PerSampleLoss, TrainConfig, TrainState, classifier_loss, denoiser_loss, run_steps

AssignBy = Literal["random", "label", "source"]
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
STATE_FILE = "train_state.safetensors"
META_FILE = "dataward.json"


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
    compartments: int = 1  # compartments made at init (add makes more)
    weights: WeightsName = "density"  # default composition weights for sampling
    router: bool = True  # train the joint router (p(compartment | x_t, t)) when there are several compartments
    guard: bool = False  # train a CPSample guard per compartment
    guard_settings: GuardConfig = field(default_factory=GuardConfig)  # guard classifier, its training and guidance defaults
    train: TrainConfig = field(default_factory=TrainConfig)  # denoiser training
    public: str | None = None  # public data spec of the public pretrained denoiser (dataward pretrain); None: none
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
            data["guard_settings"] = GuardConfig(**data["guard_settings"])
        if "autoencoder" in data:
            data["autoencoder"] = AutoencoderConfig.from_dict(data["autoencoder"])
        return cls(**data)


@dataclass
class SampleResult:
    """Samples and where they came from."""

    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: torch.Tensor | None  # (N,) or None for an unconditional ward
    attribution: torch.Tensor  # (N, K) trajectory-averaged weight per compartment (0 for compartments not used)
    final_weights: torch.Tensor  # (N, K) weights at the last step
    compartments: list[int]  # the compartments that were composed
    models: dict[int, dict]  # compartment -> {"model": id, "stage": r, "fallback": bool}
    weights: str  # router | density | single
    sampler: str
    seconds: float
    guard_guided: float | None = None  # with guards: share of guard checks (sample x step x compartment, t < max_timestep) that guided


DP_VARIANT_PREFIX = "dp-"  # Lineage.variant of DP fine-tuning: one phase (no slices), started from the public model
LATENT_VARIANT_PREFIX = "latent-"  # Lineage.variant of models on latents: names the autoencoder whose latents they saw
PUBLIC_KINDS = ("autoencoder", "public-denoiser")  # models trained on public data only (recorded as public in the ledger)


def is_dp_variant(variant: str) -> bool:
    """Whether a lineage variant (also saved in each checkpoint's metadata) is DP fine-tuning."""
    return variant.startswith(DP_VARIANT_PREFIX)


@dataclass(frozen=True)
class Lineage:
    """One kind of model for one compartment (or for all, the router), trained stage by stage."""

    kind: str  # denoiser | router | guard | public-denoiser | autoencoder
    compartment: int | None
    stage_ids: tuple[tuple[str, ...], ...]  # sorted IDs each stage trains on (cumulative slices)
    config: TrainConfig
    variant: str = ""  # "": pixel space; "latent-<autoencoder hash>"; "dp-<hash of DP config, public model, autoencoder>"

    def stage_steps(self, stage: int) -> int:
        """Optimizer steps of one stage: a share of ``config.steps``, or from the stage's own data size (epochs)."""
        stages = len(self.stage_ids)
        if self.config.steps is not None:
            base, extra = divmod(self.config.steps, stages)
            return base + (1 if stage < extra else 0)
        # stage r gets a 2/(R+1) share of the epochs, so the R stages add up to ``epochs`` passes over the final data
        return self.config.epoch_steps(2 * self.config.epochs / (stages + 1), len(self.stage_ids[stage]))


@dataclass(frozen=True)
class TrainJob:
    """Train ``lineage`` from stage ``start`` on, continuing from the checkpoint folder ``resume_from`` (ward-relative)."""

    ward: str  # the ward folder (workers open it read-only)
    lineage: Lineage
    start: int
    resume_from: str | None


@dataclass(frozen=True)
class WardHooks:
    """Callbacks a host (the HTTP service) attaches to a ward."""

    on_load: Callable[[ModelRecord], None] | None = None  # called each time a model is loaded or taken from the cache for use
    # called with a finished job's results just before they are registered; if it raises, nothing of the job is registered
    before_register: Callable[[TrainJob, list[dict]], None] | None = None


def weights_hash(path: Path) -> str:
    """SHA-256 over a safetensors file's tensors (names, dtypes, shapes, bytes), independent of file metadata."""
    tensors = load_file(str(path))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _progress_task(progress, description: str, total: int) -> Callable[..., None]:
    """An update function for a rich Progress task (or a no-op without one)."""
    if progress is None:
        return lambda *a, **k: None
    task = progress.add_task(description, total=total)
    return lambda advance=1, **fields: progress.update(task, advance=advance, **fields)


def _stable_bucket(seed: int, salt: str, sample_id: str, buckets: int) -> int:
    digest = hashlib.sha256(f"{seed}/{salt}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % buckets


class Ward:
    """A protected model family on disk. Open with :meth:`Ward.open`, make with :meth:`Ward.create`."""

    def __init__(self, path: Path, config: WardConfig, ledger: Ledger, worker: bool = False, hooks: WardHooks | None = None):
        self.path = path
        self.config = config
        self.ledger = ledger
        self.hooks = hooks or WardHooks()
        self.scheduler = make_training_scheduler(config.num_train_timesteps, config.beta_schedule)
        self._loaded: dict[int, torch.nn.Module] = {}
        self._codec: tuple[int, LatentCodec] | None = None  # (autoencoder model id, codec) of a latent ward, loaded once
        self._public_sources: dict[str, Dataset] = {}  # public data specs, loaded once
        if not worker:
            self._delete_quarantined()
            self._remove_orphans()

    # creation -----------------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        data: str | Dataset,
        *,
        compartments: int = 1,
        by: AssignBy = "random",
        slices: int = 1,
        model: str = "tiny",
        seed: int = 0,
        image_size: int = 8,
        channels: int | None = None,
        weights: WeightsName = "density",
        router: bool = True,
        guard: bool = False,
        train: TrainConfig | None = None,
        router_train: TrainConfig | None = None,
        guard_settings: GuardConfig | None = None,
        numerics: Numerics = "portable",
    ) -> "Ward":
        """Make a new ward from a data source (spec string or Dataset). Nothing is left behind on error."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise DatawardError(f"{path} already exists and is not empty: choose a new ward folder")
        if compartments < 1 or slices < 1:
            raise DatawardError(f"compartments and slices must be >= 1, got {compartments} and {slices}")
        if by not in ("random", "label", "source"):
            raise DatawardError(f"--by must be random, label or source, got {by!r}")
        if numerics not in ("portable", "native"):
            raise DatawardError(f"numerics must be portable or native, got {numerics!r}")
        dataset = load_source(data) if isinstance(data, str) else data
        spec = data if isinstance(data, str) else "dataset"
        channels = channels or dataset.shape[0]
        config = WardConfig(
            data=spec, model=model, image_size=image_size, channels=channels,
            num_classes=dataset.num_classes if dataset.labels is not None else None, seed=seed, slices=slices, by=by,
            compartments=compartments, weights=weights, router=router, guard=guard, guard_settings=guard_settings or GuardConfig(),
            numerics=numerics, train=train or TrainConfig(), router_train=router_train or WardConfig.__dataclass_fields__["router_train"].default_factory(),
        )
        build_unet(model, image_size, channels, config.num_classes, seed)  # fails early on a bad preset or size
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            (staging / "models").mkdir()
            ledger = Ledger(staging / "ledger.sqlite", create=True)
            ward = cls(staging, config, ledger)
            ward._write_config()
            ward._insert(dataset.resized(image_size, channels), spec, new_compartments=compartments)
            ledger.close()
            if path.exists():
                path.rmdir()
            os.replace(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path, worker: bool = False, hooks: WardHooks | None = None) -> "Ward":
        """Open an existing ward. ``worker=True`` (training jobs in other processes) leaves its files alone; ``hooks``
        are the host's callbacks (see :class:`WardHooks`)."""
        path = Path(path)
        config_path = path / "ward.json"
        if not config_path.is_file():
            raise DatawardError(f"{path} is not a ward (no ward.json); create one with `dataward init {path} --data digits`")
        try:
            config = WardConfig.from_json(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise DatawardError(f"{config_path} is not a valid ward config: {error}") from None
        return cls(path, config, Ledger(path / "ledger.sqlite"), worker, hooks)

    def close(self) -> None:
        """Close the ledger."""
        self.ledger.close()

    def _write_config(self) -> None:
        tmp = self.path / "ward.json.tmp"
        tmp.write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True))
        os.replace(tmp, self.path / "ward.json")

    def _insert(self, dataset: Dataset, source: str, new_compartments: int) -> list[int]:
        """Assign samples to compartments and slices and store them; returns the new compartment IDs."""
        existing = self.ledger.compartments()
        first = (max(existing) + 1) if existing else 0
        by = self.config.by
        if by == "source":
            owners = dataset.owners or tuple(source for _ in dataset.ids)
            names = sorted(set(owners))
            index = {name: first + i for i, name in enumerate(names)}
            assign = [index[o] for o in owners]
            sources = {index[name]: name for name in names}
        elif by == "label" and existing == [] :
            if dataset.labels is None:
                raise DatawardError("--by label needs labelled data")
            assign = [first + int(l) % new_compartments for l in dataset.labels.tolist()]
            sources = {first + i: f"{source} labels = {i} mod {new_compartments}" for i in range(new_compartments)}
        elif existing:  # add: a new data source is a new compartment
            assign = [first] * len(dataset)
            sources = {first: source}
        else:
            assign = [first + _stable_bucket(self.config.seed, "compartment", i, new_compartments) for i in dataset.ids]
            sources = {first + i: f"{source} (random {i}/{new_compartments})" for i in range(new_compartments)}
        labels = dataset.labels.tolist() if dataset.labels is not None else [None] * len(dataset)
        owners = dataset.owners or (None,) * len(dataset)
        images = dataset.images.numpy()
        rows = [
            (sid, labels[k], assign[k], _stable_bucket(self.config.seed, "slice", sid, self.config.slices), source, owners[k], images[k])
            for k, sid in enumerate(dataset.ids)
        ]
        self.ledger.add_samples(rows, sources, "samples-added", source=source)
        return sorted(sources)

    def _delete_quarantined(self) -> None:
        """Delete the files of quarantined models (they saw forgotten IDs); the ledger keeps their record."""
        quarantined = self.ledger.models(status="quarantined", any_compartment=True)
        for record in quarantined:
            shutil.rmtree(self.path / record.path, ignore_errors=True)
            self._loaded.pop(record.id, None)
        self.ledger.set_status([r.id for r in quarantined], "deleted", "models-deleted")

    def _remove_orphans(self) -> None:
        """Remove model folders no ledger record owns: leftovers of a crash between writing and registering."""
        kept = {r.path for r in self.ledger.models(status=None, any_compartment=True) if r.status in ("ready", "retired")}
        models_dir = self.path / "models"
        if models_dir.is_dir():
            for child in models_dir.iterdir():
                if f"models/{child.name}" not in kept:
                    shutil.rmtree(child, ignore_errors=True)

    # data ---------------------------------------------------------------------------------------------------------
    def _dataset(self, rows: list[tuple]) -> Dataset:
        c, s = self.config.channels, self.config.image_size
        images = torch.from_numpy(np.stack([np.frombuffer(r[4], dtype=np.float32).reshape(c, s, s) for r in rows]).copy())
        labels = torch.tensor([r[1] for r in rows], dtype=torch.long) if self.config.num_classes is not None else None
        return Dataset(tuple(r[0] for r in rows), images, labels, num_classes=self.config.num_classes)

    def training_data(self, compartment: int | None = None) -> Dataset:
        """The live (not forgotten) training samples, of one compartment or all."""
        rows = self.ledger.samples(compartment)
        if not rows:
            raise DatawardError(f"compartment {compartment} holds no samples" if compartment is not None else "the ward holds no samples")
        return self._dataset(rows)

    def heldout_data(self) -> Dataset | None:
        """The held-out reference set: digits' fixed held-out split for digits wards, else None."""
        if self.config.data.startswith("digits"):
            return load_source("digits:heldout").resized(self.config.image_size, self.config.channels)
        return None

    def compartments(self) -> list[int]:
        """All compartment IDs."""
        return self.ledger.compartments()

    # lineages -----------------------------------------------------------------------------------------------------
    def _stage_ids(self, compartment: int | None) -> tuple[tuple[str, ...], ...]:
        rows = self.ledger.samples(compartment)
        return tuple(tuple(r[0] for r in rows if r[3] <= stage) for stage in range(self.config.slices))

    def lineages(self) -> list[Lineage]:
        """Every model the ward should hold, with the IDs each stage trains on."""
        out = []
        if self.config.public is not None:
            if self.config.latent:
                out.append(Lineage("autoencoder", None, (tuple(sorted(self._autoencoder_data().ids)),),
                                   self.config.autoencoder.train_config(self.config.public_train.threads)))
            out.append(Lineage("public-denoiser", None, (tuple(sorted(self._public_data().ids)),), self.config.public_train,
                               self._variant("public-denoiser", None)))
        compartments = self.compartments()
        for c in compartments:
            stage_ids = self._stage_ids(c)
            if not stage_ids[-1]:
                continue
            if self._is_dp(c):  # DP-SGD runs as one phase over the whole compartment (accounted as one run)
                out.append(Lineage("denoiser", c, (stage_ids[-1],), self.config.train, self._dp_variant()))
            else:
                out.append(Lineage("denoiser", c, stage_ids, self.config.train, self._variant("denoiser", c)))
            if self.config.guard:
                out.append(Lineage("guard", c, stage_ids, self.config.guard_settings.train_config(), self._variant("guard", c)))
        if self.config.router and len(compartments) > 1:
            out.append(Lineage("router", None, self._stage_ids(None), self.config.router_train, self._variant("router", None)))
        return out

    def _public_source(self, spec: str) -> Dataset:
        """A public data source at the ward's image size, sorted by ID (loaded once)."""
        if spec not in self._public_sources:
            data = load_source(spec).resized(self.config.image_size, self.config.channels)
            self._public_sources[spec] = data.select(sorted(data.ids))
        return self._public_sources[spec]

    def _public_data(self) -> Dataset:
        """The public denoiser's data: labelled exactly when the ward is class-conditional."""
        public = self._public_source(self.config.public)
        if (public.labels is None) != (self.config.num_classes is None) or (public.num_classes or 0) > (self.config.num_classes or 0):
            raise DatawardError(f"public data {self.config.public} has {public.num_classes} classes; the ward has {self.config.num_classes}")
        return public

    def _autoencoder_data(self) -> Dataset:
        """The public autoencoder's data (labels unused)."""
        return self._public_source(self.config.autoencoder_data)

    def _is_dp(self, compartment: int) -> bool:
        dp_set = self.config.dp_compartments
        return self.config.dp is not None and (dp_set is None or compartment in dp_set)

    def _dp_variant(self) -> str:
        """Names the DP recipe: the DP config, the public model it starts from and the latent space (changing any retrains)."""
        public = self.served("public-denoiser").get(None)
        basis = json.dumps(asdict(self.config.dp), sort_keys=True) + (public.metadata["weights_sha256"] if public else "scratch") + self._latent_tag()
        return DP_VARIANT_PREFIX + hashlib.sha256(basis.encode()).hexdigest()[:16]

    def _latent_tag(self) -> str:
        """"" for a pixel ward; "latent-<autoencoder weights hash>" for a latent one (a new autoencoder retrains every model)."""
        if not self.config.latent:
            return ""
        autoencoder = self.served("autoencoder").get(None)
        return LATENT_VARIANT_PREFIX + (autoencoder.metadata["weights_sha256"][:16] if autoencoder else "untrained")

    def _variant(self, kind: str, compartment: int | None) -> str:
        """The variant a model of this kind must carry to be current (see :class:`Lineage`)."""
        if kind == "autoencoder":
            return ""
        if kind == "denoiser" and compartment is not None and self._is_dp(compartment):
            return self._dp_variant()
        return self._latent_tag()

    def model_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoisers, router and guards see: the images, or the autoencoder's latents."""
        if self.config.latent:
            return self.config.autoencoder.latent_shape()
        return (self.config.channels, self.config.image_size, self.config.image_size)

    def codec(self) -> LatentCodec:
        """The served public autoencoder of a latent ward, with its scaling factor."""
        if not self.config.latent:
            raise DatawardError("this ward works in pixel space: it has no autoencoder (pretrain with --latent for one)")
        record = self.served("autoencoder").get(None)
        if record is None:
            raise DatawardError(f"this latent ward has no trained autoencoder: run `dataward pretrain {self.path} --latent`")
        if self._codec is None or self._codec[0] != record.id:
            self._codec = (record.id, LatentCodec(self._load(record), float(record.metadata["scaling_factor"]), self.config.autoencoder))
        return self._codec[1]

    def _denoiser_probe(self) -> UNet2DModel:
        """A denoiser of the ward's preset and model shape (raises early when the preset cannot take that shape)."""
        channels, size, _ = self.model_shape()
        return build_unet(self.config.model, size, channels, self.config.num_classes, 0)

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] as the models see them: unchanged, or encoded to scaled latents."""
        return self.codec().encode(images) if self.config.latent else images

    def _model_data(self, data: Dataset) -> Dataset:
        """A dataset as the models see it (the same IDs and labels; latents in a latent ward)."""
        return self.codec().encode_dataset(data) if self.config.latent else data

    def _build(self, lineage: Lineage) -> torch.nn.Module:
        cfg = self.config
        seed = derive_seed(cfg.seed, lineage.kind, lineage.compartment, "init")
        channels, size, _ = self.model_shape()
        if lineage.kind in ("denoiser", "public-denoiser"):
            return build_unet(cfg.model, size, channels, cfg.num_classes, seed)
        if lineage.kind == "router":
            return build_classifier(channels, len(self.compartments()), seed)
        if lineage.kind == "guard":
            return build_guard(channels, seed, cfg.guard_settings)
        if lineage.kind == "autoencoder":
            return build_autoencoder(cfg.autoencoder, seed)
        raise ValueError(lineage.kind)

    def _loss_and_targets(self, lineage: Lineage, ids: tuple[str, ...]) -> tuple[PerSampleLoss, torch.Tensor | None]:
        if lineage.kind in ("denoiser", "public-denoiser"):
            return denoiser_loss(self.scheduler), None
        if lineage.kind == "router":
            column = {c: i for i, c in enumerate(self.compartments())}
            rows = self.ledger.sample_rows(list(ids))
            return classifier_loss(self.scheduler), torch.tensor([column[rows[i][0]] for i in ids])
        if lineage.kind == "guard":
            return guard_loss(self.scheduler, self.config.guard_settings), guard_labels(list(ids), self.config.seed)
        if lineage.kind == "autoencoder":
            return autoencoder_loss(self.config.autoencoder.kl_weight), None
        raise ValueError(lineage.kind)

    def _ready_stages(self, lineage: Lineage) -> dict[int, ModelRecord]:
        """Stages of a lineage whose ready checkpoint was trained on exactly the IDs the stage should see now."""
        out = {}
        for record in self.ledger.models(lineage.kind, lineage.compartment):
            if record.metadata.get("variant", "") != lineage.variant:
                continue
            if record.stage < len(lineage.stage_ids) and record.ids_hash == ids_hash(lineage.stage_ids[record.stage]):
                if lineage.kind != "router" or record.metadata.get("num_outputs") == len(self.compartments()):
                    out[record.stage] = record
        return out

    def plan(self, lineage: Lineage, from_scratch: bool = False) -> TrainJob | None:
        """What is missing in a lineage: a job that trains stages ``start``.. from the last matching checkpoint (None if up to date)."""
        ready = {} if from_scratch else self._ready_stages(lineage)
        start = 0
        while start in ready:
            start += 1
        if start == len(lineage.stage_ids):
            return None
        resume = None if start == 0 else ready[start - 1].path
        return TrainJob(str(self.path), lineage, start, resume)

    def run_job(self, job: TrainJob, device: str = "cpu", progress=None, out_root: Path | None = None) -> list[dict]:
        """Train a job's stages and write each checkpoint folder under ``out_root`` (default: the ward's models/).

        Reads the ledger, never writes it, so it can run in a worker process (see :mod:`dataward.training.executors`).
        Returns one record per stage: ``{"stage", "folder", "ids", "metadata"}``.
        """
        lineage = job.lineage
        stages = len(lineage.stage_ids)
        out_root = Path(out_root or self.path / "models")
        from dataward.training.executors import configure_torch

        configure_torch(device, lineage.config.threads)  # thread count (and deterministic CUDA kernels): part of determinism
        numerics.require(self.config.numerics)  # ... and the CPU kernels
        if is_dp_variant(lineage.variant):
            return [self._run_dp(lineage, device, progress, out_root)]
        model = self._build(lineage).to(device)
        state = TrainState.fresh(model, lineage.config)
        if job.resume_from is not None:
            state.load(self.path / job.resume_from / STATE_FILE)
        name = lineage.kind + ("" if lineage.compartment is None else f" {lineage.compartment}")
        update = _progress_task(progress, f"train {name}", sum(lineage.stage_steps(r) for r in range(job.start, stages)))
        results = []
        for stage in range(job.start, stages):
            ids = lineage.stage_ids[stage]
            data = self._stage_data(lineage, stage)
            loss, targets = self._loss_and_targets(lineage, ids)
            generator = torch.Generator().manual_seed(derive_seed(self.config.seed, lineage.kind, lineage.compartment, "stage", stage))
            run_steps(state, data, loss, lineage.stage_steps(stage), lineage.config, generator, targets, device,
                      on_step=lambda value: update(1, description=f"train {name} stage {stage + 1}/{stages} loss {value:.3f}"))
            extra = None
            if lineage.kind == "guard":
                extra = self._guard_accuracy(state, data, targets, stage)
            elif lineage.kind == "autoencoder":
                extra = self._autoencoder_summary(state, data)
            results.append(self._save_stage(lineage, stage, ids, state, out_root, extra))
        return results

    def _guard_accuracy(self, state: TrainState, data: Dataset, labels: torch.Tensor, stage: int) -> dict:
        """A guard's accuracy on its own random bits by timestep (EMA weights, as it guides sampling), for its metadata."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "guard-accuracy", stage))
        accuracy = guard_accuracy_by_t(guard_model(state), data, labels, self.scheduler, ACCURACY_TIMESTEPS, generator)
        return {"accuracy_by_t": {str(t): round(a, 4) for t, a in accuracy.items()}}

    def _autoencoder_summary(self, state: TrainState, public: Dataset) -> dict:
        """The trained autoencoder's latent scaling factor and reconstruction error on its public data, for its metadata."""
        autoencoder = state.ema_model()
        codec = LatentCodec(autoencoder, latent_scaling_factor(autoencoder, self.config.autoencoder, public), self.config.autoencoder)
        reconstruction = codec.decode(codec.encode(public.images))
        return {"scaling_factor": codec.scaling_factor, "latent_shape": list(self.config.autoencoder.latent_shape()),
                "public_reconstruction_mse": round(float((reconstruction - public.images).pow(2).mean()), 6)}

    def _stage_data(self, lineage: Lineage, stage: int) -> Dataset:
        """The examples one stage trains on, checked against the plan (sorted by ID), as the model sees them."""
        if lineage.kind == "autoencoder":
            return self._autoencoder_data()
        if lineage.kind == "public-denoiser":
            return self._model_data(self._public_data())
        data = self._dataset(self.ledger.samples(lineage.compartment, max_slice=stage if len(lineage.stage_ids) > 1 else None))
        if data.ids != lineage.stage_ids[stage]:
            raise DatawardError(f"the ward's data changed while training {lineage.kind} {lineage.compartment} stage {stage}: run `dataward train` again")
        return self._model_data(data)

    def _run_dp(self, lineage: Lineage, device: str, progress, out_root: Path) -> dict:
        """DP-SGD fine-tuning of one compartment's denoiser from the public model (DP-LDM), or from scratch (DPDM-style)."""
        from dataward.training.privacy import plan_dp

        data = self._stage_data(lineage, 0)
        model = self._build(lineage)
        public = self.served("public-denoiser").get(None)
        if public is not None:
            model.load_state_dict(self._load(public).state_dict())
        dp = self.config.dp
        plan = plan_dp(dp, len(data), model)
        update = _progress_task(progress, f"DP fine-tune {lineage.compartment}", plan.steps)
        state, record = dp_finetune(
            model.to(device), data, dp, lineage.config, seed=derive_seed(self.config.seed, "dp", lineage.compartment), scheduler=self.scheduler,
            calibration=None if public is None else self._model_data(self._public_data()),
            device=device, on_step=lambda value: update(1, description=f"DP fine-tune {lineage.compartment} (ε={dp.epsilon})"),
            public=self.config.public,
        )
        return self._save_stage(lineage, 0, lineage.stage_ids[0], state, out_root, {"privacy": record.to_dict(check_accountant=other_accountant(dp.accountant))})

    def _save_stage(self, lineage: Lineage, stage: int, ids: tuple[str, ...], state: TrainState, out_root: Path, extra: dict | None = None) -> dict:
        """Write one stage's checkpoint folder atomically (temp folder, then rename)."""
        name = f"{lineage.kind}-c{'all' if lineage.compartment is None else lineage.compartment}-s{stage}-{uuid.uuid4().hex[:8]}"
        tmp = out_root / f".tmp-{name}"
        model = self._build(lineage)
        model.load_state_dict(state.ema_state_dict())
        model.save_pretrained(str(tmp), safe_serialization=True)
        state.save(tmp / STATE_FILE)
        metadata = {
            "kind": lineage.kind, "compartment": lineage.compartment, "stage": stage, "ids_hash": ids_hash(ids),
            "num_ids": len(ids), "seed": self.config.seed, "steps": state.step, "train": asdict(lineage.config),
            "dataward_version": dataward.__version__, "weights_sha256": weights_hash(tmp / WEIGHTS_FILE),
            "numerics": numerics.fingerprint(),
        }
        if lineage.kind == "router":
            metadata["num_outputs"] = len(self.compartments())
        metadata |= {"variant": lineage.variant} | (extra or {})
        (tmp / META_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        os.replace(tmp, out_root / name)
        return {"stage": stage, "folder": name, "ids": list(ids), "metadata": metadata}

    def register(self, job: TrainJob, results: list[dict]) -> None:
        """Record a finished job's checkpoints in the ledger (the driver's part; one transaction per stage, in order),
        after ``hooks.before_register`` let them through."""
        if self.hooks.before_register is not None:
            self.hooks.before_register(job, results)
        for r in results:
            if not (self.path / "models" / r["folder"] / WEIGHTS_FILE).is_file():
                raise DatawardError(f"checkpoint models/{r['folder']} vanished before it was registered (did another process open "
                                    f"this ward for writing while training ran?): run `dataward train {self.path}` again")
            self.ledger.register_model(job.lineage.kind, job.lineage.compartment, r["stage"], f"models/{r['folder']}", r["ids"],
                                       r["metadata"]["ids_hash"], r["metadata"], public=job.lineage.kind in PUBLIC_KINDS)

    # training -----------------------------------------------------------------------------------------------------
    def train(self, device: str = "cpu", progress=None, executor: str = "local", only: tuple[str, ...] | None = None, **executor_options) -> dict:
        """Train every model that is missing or out of date (after init, add, forget or a crash); finish pending forgets.

        Compartments' models are independent jobs; models that span compartments (the router) run after them.
        ``executor`` is ``local`` (in this process) or ``ray`` (one Ray task per job, see :mod:`dataward.training.executors`).
        ``only`` limits training to some model kinds (e.g. ``("public-denoiser",)`` for ``dataward pretrain``).
        """
        started = time.time()
        waves = (lambda l: l.kind == "autoencoder", lambda l: l.kind == "public-denoiser", lambda l: l.compartment is not None,
                 lambda l: l.kind == "router")
        # the autoencoder first (the others see its latents), the public denoiser (DP starts from it), compartments, the router
        for in_wave in waves:
            wave = [l for l in self.lineages() if in_wave(l) and (only is None or l.kind in only)]
            jobs = [job for job in (self.plan(l) for l in wave) if job is not None]
            if executor == "local":
                for job in jobs:
                    self.register(job, self.run_job(job, device, progress))
            elif executor == "ray":
                from dataward.training.executors import run_on_ray

                for job, results in run_on_ray(jobs, device=device, progress=progress, **executor_options):
                    self.register(job, results)
            else:
                raise DatawardError(f"unknown executor {executor!r}: expected local or ray")
        self._retire_stale()
        pending = [r for r, _ in self.ledger.pending_forgets()]
        if pending and not self.models_missing():
            self.ledger.finish_forgets(pending)
        return {"seconds": time.time() - started, "finished_forgets": pending}

    def _retire_stale(self) -> None:
        """Retire ready models that no longer fit the ward: routers after add, models of another recipe (DP on/off, another
        latent space or none)."""
        stale = [r.id for r in self.ledger.models("router", None) if r.metadata.get("num_outputs") != len(self.compartments())]
        for lineage in self.lineages():
            stale += [r.id for r in self.ledger.models(lineage.kind, lineage.compartment) if r.metadata.get("variant", "") != lineage.variant]
        self.ledger.set_status(stale, "retired", "models-retired")

    def models_missing(self) -> bool:
        """Whether any model the ward should hold is missing or out of date."""
        return any(len(self._ready_stages(l)) < len(l.stage_ids) for l in self.lineages())

    # serving ------------------------------------------------------------------------------------------------------
    def served(self, kind: str = "denoiser") -> dict[int | None, ModelRecord]:
        """Per compartment (None for the router), the newest ready stage that saw no forgotten ID."""
        out: dict[int | None, ModelRecord] = {}
        keys = [None] if kind in ("router", *PUBLIC_KINDS) else self.compartments()
        for c in keys:
            records = [r for r in self.ledger.models(kind, c) if r.metadata.get("variant", "") == self._variant(kind, c)]
            if kind == "router":
                records = [r for r in records if r.metadata.get("num_outputs") == len(self.compartments())]
            if records:
                out[c] = records[-1]
        return out

    def model(self, record: ModelRecord) -> torch.nn.Module:
        """The model of a ledger record, in eval mode, loaded once and then taken from the cache."""
        return self._load(record)

    def _load(self, record: ModelRecord) -> torch.nn.Module:
        if self.hooks.on_load is not None:
            self.hooks.on_load(record)
        if record.id not in self._loaded:
            cls = {"denoiser": UNet2DModel, "public-denoiser": UNet2DModel, "autoencoder": AutoencoderKL}.get(record.kind, NoisyClassifier)
            folder = self.path / record.path
            try:
                model = cls.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False)
            except (OSError, ValueError, RuntimeError) as error:
                raise DatawardError(f"cannot load model {record.kind} from {folder}: {error}") from None
            self._loaded[record.id] = model.eval()
        return self._loaded[record.id]

    def drop_unready_models(self) -> None:
        """Drop cached models that are no longer ready in the ledger (quarantined, deleted or retired)."""
        ready = self.ledger.ready_models(list(self._loaded))
        for model_id in [m for m in self._loaded if m not in ready]:
            del self._loaded[model_id]

    def denoiser(self, compartment: int, guard: bool = False, guard_scale: float | None = None, guard_alpha: float | None = None,
                 guard_activity: GuardActivity | None = None) -> Denoiser:
        """The served ε callable of one compartment (optionally guided by its guard, counting its checks in ``guard_activity``)."""
        served = self.served()
        if compartment not in served:
            raise DatawardError(f"compartment {compartment} has no servable model (known: {sorted(served)})")
        eps = unet_eps(self._load(served[compartment]))
        if not guard:
            return eps
        guards = self.served("guard")
        if compartment not in guards:
            raise DatawardError(f"compartment {compartment} has no trained guard: run `dataward guard {self.path}`")
        settings = self.config.guard_settings
        guidance = guard_guidance(self._load(guards[compartment]), settings.scale if guard_scale is None else guard_scale,
                                  settings.alpha if guard_alpha is None else guard_alpha, settings.max_timestep, guard_activity)
        return guarded(eps, guidance, self.scheduler.alphas_cumprod)

    def sample(
        self,
        n: int,
        *,
        label: int | None = None,
        seed: int = 0,
        sampler: str | None = None,
        steps: int = 50,
        allowed: list[int] | None = None,
        weights: WeightsName | None = None,
        top_k: int | None = None,
        guard: bool = False,
        guard_scale: float | None = None,
        guard_alpha: float | None = None,
        progress=None,
    ) -> SampleResult:
        """Generate ``n`` images composed over the allowed compartments (all by default)."""
        started = time.time()
        if n < 1:
            raise DatawardError(f"n must be at least 1, got {n}")
        if steps < 1 or steps > self.config.num_train_timesteps:
            raise DatawardError(f"steps must be between 1 and {self.config.num_train_timesteps}, got {steps}")
        weights = weights or self.config.weights
        if weights not in ("router", "density"):
            raise DatawardError(f"weights must be router or density, got {weights!r}")
        if top_k is not None and top_k < 1:
            raise DatawardError(f"top-k must be at least 1, got {top_k}")
        known = self.compartments()
        allowed = sorted(set(known if allowed is None else allowed))
        unknown = [c for c in allowed if c not in known]
        if unknown:
            raise DatawardError(f"unknown compartment(s) {unknown}: this ward has {known}")
        served = self.served()
        use = [c for c in allowed if c in served]
        if not use:
            raise DatawardError(f"no trained model for compartments {allowed}: run `dataward train {self.path}`")
        counts = self.ledger.counts()
        num_classes = self.config.num_classes
        generator = torch.Generator().manual_seed(seed)
        y = None
        if num_classes is not None:
            if label is not None:
                if not 0 <= label < num_classes:
                    raise DatawardError(f"label must be between 0 and {num_classes - 1}, got {label}")
                y = torch.full((n,), label, dtype=torch.long)
            else:
                present = sorted({l for c in use for l in counts[c]["labels"]})
                y = torch.tensor(present)[torch.randint(0, len(present), (n,), generator=generator)]
        elif label is not None:
            raise DatawardError("this ward is unconditional: --label is not available")
        x_T = torch.randn((n, *self.model_shape()), generator=generator)  # images, or latents in a latent ward
        activity = GuardActivity() if guard else None
        denoisers = [self.denoiser(c, guard, guard_scale, guard_alpha, activity) for c in use]
        composed = None
        if len(use) == 1:
            eps, mode = denoisers[0], "single"
        else:
            mode = weights
            if weights == "router":
                routers = self.served("router")
                if None not in routers:
                    raise DatawardError("this ward has no trained router: sample with --weights density, or create the ward with the router on")
                router_model = self._load(routers[None])
                router = lambda x_t, t: router_model(x_t, t)
                columns = [known.index(c) for c in use]
            else:
                router, columns = None, None
            composed = ComposedDenoiser(denoisers, self._log_prior(use, y, counts, n), self.scheduler.alphas_cumprod, weights, router, columns, top_k)
            eps = composed
        sampler = sampler or ("ddpm" if mode == "density" else "ddim")
        if mode == "density" and sampler != "ddpm":
            raise DatawardError("density weights need the stochastic sampler: use --sampler ddpm (or --weights router)")
        update = _progress_task(progress, f"sample {n}", steps)
        if self.config.latent:  # the same loop over latents (no x_0 clipping), then the public autoencoder decodes
            eps = LatentDenoiser(eps, self.codec())
            scheduler = make_latent_scheduler(self.scheduler, sampler)
        else:
            scheduler = make_sampler(self.scheduler, sampler)
        x0 = sample_loop(eps, x_T, scheduler, steps=steps, y=y, generator=generator, progress=lambda i: update(1))
        if self.config.latent:
            x0 = eps.decode(x0)
        k = len(known)
        attribution, final = torch.zeros(n, k), torch.zeros(n, k)
        cols = [known.index(c) for c in use]
        if composed is None:
            attribution[:, cols[0]] = final[:, cols[0]] = 1.0
        else:
            attribution[:, cols] = composed.attribution()
            final[:, cols] = composed.final_weights
        stages = {c: {"model": served[c].id, "stage": served[c].stage, "fallback": self.is_fallback(served[c])} for c in use}
        return SampleResult(((x0.clamp(-1, 1) + 1) / 2), y, attribution, final, use, stages, mode, sampler, time.time() - started,
                            None if activity is None else activity.share)

    def _log_prior(self, use: list[int], y: torch.Tensor | None, counts: dict, n: int) -> torch.Tensor:
        """log λ_i per sample: the compartment's share of the data (of the sample's class when conditional)."""
        if y is None:
            sizes = torch.tensor([float(counts[c]["samples"]) for c in use])
            return sizes.log().expand(n, -1).clone()
        table = torch.tensor([[float(counts[c]["labels"].get(l, 0)) for c in use] for l in range(self.config.num_classes)])
        return table[y].clamp_min(1e-12).log()

    # forgetting ---------------------------------------------------------------------------------------------------
    def forget(self, ids: list[str], retrain: bool = True, device: str = "cpu", progress=None) -> dict:
        """Forget sample IDs: in effect at once (durable, quarantines every model that saw them), then retrain."""
        ids = sorted(set(ids))
        if not ids:
            raise DatawardError("no sample IDs given to forget")
        rows = self.ledger.sample_rows(ids)
        unknown = [i for i in ids if i not in rows]
        if unknown:
            raise DatawardError(f"unknown sample ID(s), nothing was forgotten: {', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
        already = [i for i in ids if rows[i][2] is not None]
        new = [i for i in ids if rows[i][2] is None]
        result = {"ids": new, "already_forgotten": already}
        if not new:
            return result | {"request": None, "state": "noop", "message": f"all {len(already)} ID(s) were already forgotten"}
        request = uuid.uuid4().hex[:12]
        quarantined = self.ledger.accept_forget(request, new)
        self._delete_quarantined()
        result |= {"request": request, "quarantined_models": len(quarantined), "serving_during_retraining": self.serving_state()}
        if retrain:
            started = time.time()
            self.train(device=device, progress=progress)
            result["retrain_seconds"] = time.time() - started
        result["state"] = self.ledger.forget_request(request)["state"]
        return result

    def _stage_count(self, record: ModelRecord) -> int:
        """Stages of the lineage a served model belongs to: DP models train in one phase, others in ``slices`` stages."""
        return 1 if is_dp_variant(record.metadata.get("variant", "")) else self.config.slices

    def is_fallback(self, record: ModelRecord) -> bool:
        """Whether a served model is an earlier stage's checkpoint (its lineage is retraining after a forget)."""
        return record.stage < self._stage_count(record) - 1

    def serving_state(self) -> dict[str, str]:
        """Per compartment: what sampling uses right now (complete, a fallback stage, or left out)."""
        served = self.served()
        out = {}
        for c in self.compartments():
            if c not in served:
                out[str(c)] = "left out (no model that never saw a forgotten ID; retraining)" if self.ledger.pending_forgets() else "untrained"
            elif self.is_fallback(served[c]):
                out[str(c)] = f"fallback: stage {served[c].stage + 1}/{self._stage_count(served[c])} checkpoint"
            else:
                out[str(c)] = "complete"
        return out

    def verify(self, device: str = "cpu", progress=None, compartments: list[int] | None = None) -> dict:
        """Forgetting certificate: retrain served models from scratch on the live IDs and compare weight hashes.

        All models by default; with ``compartments``, those compartments' models and every joint model (the router).
        """
        forgotten = set(self.ledger.forgotten_ids())
        checks = []
        with tempfile.TemporaryDirectory(prefix="dataward-verify-") as scratch:
            for lineage in self.lineages():
                if compartments is not None and lineage.compartment is not None and lineage.compartment not in compartments:
                    continue
                served = self.served(lineage.kind).get(lineage.compartment)
                if served is None:
                    checks.append({"kind": lineage.kind, "compartment": lineage.compartment, "equal": False, "reason": "no served model"})
                    continue
                saw = self.ledger.model_sample_ids(served.id)
                results = self.run_job(self.plan(lineage, from_scratch=True), device, progress, out_root=Path(scratch))
                scratch_hash = weights_hash(Path(scratch) / results[served.stage]["folder"] / WEIGHTS_FILE)
                served_hash = weights_hash(self.path / served.path / WEIGHTS_FILE)
                check = {
                    "kind": lineage.kind, "compartment": lineage.compartment, "stage": served.stage,
                    "served_sha256": served_hash, "scratch_sha256": scratch_hash,
                    "equal": served_hash == scratch_hash, "saw_forgotten_ids": len(saw & forgotten),
                }
                if not check["equal"]:  # say whether this machine computes other bytes than the one that trained the model
                    machine = numerics.differences(served.metadata.get("numerics"), numerics.fingerprint())
                    check["reason"] = ("this machine's numerics differ from the training machine's: " + "; ".join(machine)) if machine else \
                        "same numerics as the training machine: the served model is not what its lineage trains"
                checks.append(check)
        ok = bool(checks) and all(c["equal"] and not c.get("saw_forgotten_ids") for c in checks)
        return {"ok": ok, "forgotten": len(forgotten), "models": checks}

    def pretrain(self, public: str, train: TrainConfig | None = None, device: str = "cpu", progress=None, latent: bool = False,
                 autoencoder: AutoencoderConfig | None = None, autoencoder_data: str | None = None) -> dict:
        """Pretrain the public models on public data (``dataward pretrain``): the denoiser that DP fine-tuning starts from,
        in pixel space or (``latent``) in the latent space of a public autoencoder trained first on ``autoencoder_data``
        (DP-LDM). Switching between pixel and latent space makes every compartment model out of date: ``train`` retrains them."""
        from dataclasses import replace as replace_config

        autoencoder = replace_config(autoencoder or self.config.autoencoder, image_size=self.config.image_size, channels=self.config.channels)
        self.config = replace_config(self.config, public=public, public_train=train or self.config.public_train, latent=latent,
                                     autoencoder=autoencoder, autoencoder_data=autoencoder_data or self.config.autoencoder_data)
        self._public_data()  # fails early on bad public data
        if latent:
            build_autoencoder(autoencoder, 0)  # fails early on an image size the autoencoder cannot take
            try:
                self._denoiser_probe()  # ... or a latent size the denoiser preset cannot take
            except DatawardError as error:
                shape = "x".join(map(str, self.model_shape()))
                raise DatawardError(f"the {shape} latents are too small for the {self.config.model!r} preset ({error}): "
                                    f"use a smaller preset or larger images") from None
            self._autoencoder_data()
        self._write_config()
        return self.train(device=device, progress=progress, only=PUBLIC_KINDS)

    def enable_dp(self, dp: DPConfig, compartments: list[int] | None = None, train: bool = True, device: str = "cpu", progress=None) -> dict:
        """Train the compartments' denoisers with DP-SGD (``dataward train --dp``): validated before anything is written."""
        from dataclasses import replace as replace_config

        from dataward.training.privacy import plan_dp

        known = self.compartments()
        chosen = known if compartments is None else sorted(set(compartments))
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise DatawardError(f"unknown compartment(s) {unknown}: this ward has {known}")
        probe = self._denoiser_probe()
        for c in chosen:
            plan_dp(dp, self.ledger.counts()[c]["samples"], probe)  # ε, δ, clip, budget, layers: errors before training
        self.config = replace_config(self.config, dp=dp, dp_compartments=None if compartments is None else tuple(chosen))
        self._write_config()
        return self.train(device=device, progress=progress) if train else {}

    def privacy(self) -> dict | None:
        """(ε, δ) per DP compartment and for the ward (parallel composition: the max over disjoint compartments)."""
        if self.config.dp is None:
            return None
        served = self.served()
        records, per = [], {}
        for c in self.compartments():
            record = served.get(c)
            privacy = record.metadata.get("privacy") if record else None
            records.append(privacy)
            per[str(c)] = "not DP" if privacy is None else {k: privacy.get(k) for k in (
                "epsilon", "delta", "sigma", "clip", "sample_rate", "steps", "history", "trainable", "trainable_fraction", "accountant", "epsilon_check",
                "noise_multiplicity")} | {"lr": privacy.get("extra", {}).get("lr")}
        eps = ward_epsilon(records)
        notes = []
        if any(r is None for r in records):
            notes.append("some compartments are not DP-trained: the ward as a whole has no finite ε; sample with --allow over DP compartments")
        if self.served("router"):
            notes.append("the router saw every compartment without DP: sample with --weights density for the DP guarantee")
        if self.config.guard:
            notes.append("guards are trained on private data without DP: sampling with --guard is not covered by ε")
        return {"ward_epsilon": eps if math.isfinite(eps) else "inf", "ward_delta": ward_delta(records), "compartments": per, "notes": notes}

    def enable_guards(self, settings: GuardConfig | None = None, train: bool = True, device: str = "cpu", progress=None) -> dict:
        """Turn on CPSample guards for every compartment (``dataward guard``) and train them."""
        from dataclasses import replace as replace_config

        self.config = replace_config(self.config, guard=True, guard_settings=settings or self.config.guard_settings)
        self._write_config()
        return self.train(device=device, progress=progress) if train else {}

    # continual learning -------------------------------------------------------------------------------------------
    def add(self, data: str | Dataset, train: bool = True, device: str = "cpu", progress=None) -> dict:
        """Add new data as new compartment(s); existing compartments' models are untouched."""
        dataset = load_source(data) if isinstance(data, str) else data
        spec = data if isinstance(data, str) else "dataset"
        if (dataset.labels is None) != (self.config.num_classes is None):
            raise DatawardError("the new data must be labelled exactly when the ward is class-conditional")
        if dataset.labels is not None and int(dataset.labels.max()) >= self.config.num_classes:
            raise DatawardError(f"the new data has label {int(dataset.labels.max())} but the ward has {self.config.num_classes} classes")
        new = self._insert(dataset.resized(self.config.image_size, self.config.channels), spec, new_compartments=1)
        out = {"compartments": new, "samples": len(dataset)}
        if train:
            out |= self.train(device=device, progress=progress)
        return out

    # status -------------------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """Everything a user wants to know about the ward, JSON-ready."""
        counts = self.ledger.counts()
        sources = self.ledger.compartment_sources()
        served = self.served()
        serving = self.serving_state()
        guards = self.served("guard")
        compartments = []
        for c in self.compartments():
            entry = {"id": c, "source": sources[c], "samples": counts[c]["samples"], "forgotten": counts[c]["forgotten"], "serving": serving[str(c)]}
            if c in served:
                entry["model"] = {"id": served[c].id, "stage": served[c].stage, "path": served[c].path, "steps": served[c].metadata.get("steps"), "ids_hash": served[c].ids_hash}
            if self.config.guard:
                entry["guard"] = None if c not in guards else {
                    "id": guards[c].id, "stage": guards[c].stage, "accuracy_by_t": guards[c].metadata.get("accuracy_by_t")}
            compartments.append(entry)
        router = self.served("router").get(None)
        public = self.served("public-denoiser").get(None)
        autoencoder = self.served("autoencoder").get(None) if self.config.latent else None
        return {
            "path": str(self.path),
            "config": asdict(self.config),
            "compartments": compartments,
            "router": None if router is None else {"id": router.id, "stage": router.stage, "saw_compartments": "all"},
            "samples": sum(c["samples"] for c in counts.values()),
            "forgotten": sum(c["forgotten"] for c in counts.values()),
            "pending_forgets": [r for r, _ in self.ledger.pending_forgets()],
            "public_model": None if public is None else {"id": public.id, "data": self.config.public, "public": True},
            "latent": None if not self.config.latent else {
                "latent_shape": list(self.model_shape()),
                "autoencoder": None if autoencoder is None else {
                    "id": autoencoder.id, "data": self.config.autoencoder_data, "public": True,
                    **{k: autoencoder.metadata.get(k) for k in ("scaling_factor", "public_reconstruction_mse")}}},
            "privacy": self.privacy(),
            "events": self.ledger.events(10),
        }
