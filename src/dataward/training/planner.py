"""What a ward should hold and what is missing: lineages, their current recipe (variant), and training jobs.

Every model is trained in SISA *stages*: stage r of a :class:`Lineage` (one kind of model for one compartment) trains on
slices 0..r, continuing from stage r-1. :meth:`Planner.plan` finds the first stage whose expected IDs hash has no
ready checkpoint of the current variant and makes a :class:`TrainJob` that retrains from the last stage that still
matches. Forgetting, resuming after a crash, adding a compartment and first training are all that one routine.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from dataward.config import TrainConfig, WardConfig
from dataward.data import ids_hash
from dataward.errors import DatawardError
from dataward.store.checkpoints import STATE_FILE, check_files
from dataward.store.ledger import Ledger, ModelRecord
from dataward.training.kinds import KINDS, KindContext
from dataward.training.sources import WardData

DP_VARIANT_PREFIX = "dp-"  # variant of DP fine-tuning (one phase, no slices, from the public model)
BASE_VARIANT_PREFIX = "base-"  # variant of denoisers fine-tuned from the ward's base: names the base (and the adapter)
LATENT_VARIANT_PREFIX = "latent-"  # variant of models on latents: names the autoencoder whose latents they saw
CALIBRATED_VARIANT_PREFIX = "calibrated-"  # variant of calibrated guards: names the weight and the public non-members they trained with


@dataclass(frozen=True)
class Lineage:
    """One kind of model for one compartment (or for all, the router), trained stage by stage."""

    kind: str  # a name in dataward.training.kinds.KINDS
    compartment: int | None
    stage_ids: tuple[tuple[str, ...], ...]  # sorted IDs each stage trains on (cumulative slices)
    config: TrainConfig
    # the recipe a checkpoint must carry to be current (saved in its metadata): "" for pixel space,
    # "latent-<autoencoder hash>", "dp-<hash of DP config, public model, autoencoder>", and for a denoiser fine-tuned
    # from the ward's base "base-<base hash>[-lora<rank>]" (after the latent tag and a "+")
    variant: str = ""
    dp: bool = False  # DP-SGD fine-tuning: one phase over the whole compartment (accounted as one run)

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


class Planner:
    """Reads the ledger to say which models a ward should hold, which it serves, and what must be trained."""

    def __init__(self, path: Path, config: WardConfig, ledger: Ledger, data: WardData, context: KindContext):
        self.path = path
        self.config = config
        self.ledger = ledger
        self.data = data
        self.context = context

    def lineages(self) -> list[Lineage]:
        """Every model the ward should hold, with the IDs each stage trains on."""
        cfg, out = self.config, []
        if cfg.public is not None and cfg.base != "imported":
            if cfg.latent:
                out.append(Lineage("autoencoder", None, (tuple(sorted(self.data.autoencoder_data().ids)),), self.budget("autoencoder")))
            out.append(Lineage("public-denoiser", None, (tuple(sorted(self.data.public_data().ids)),), self.budget("public-denoiser"),
                               self.variant("public-denoiser", None)))
        compartments = self.ledger.compartments()
        for c in compartments:
            stage_ids = self.data.stage_ids(c)
            if not stage_ids[-1]:
                continue
            if cfg.is_dp(c):
                out.append(Lineage("denoiser", c, (stage_ids[-1],), self.budget("denoiser"), self.variant("denoiser", c), dp=True))
            else:
                out.append(Lineage("denoiser", c, stage_ids, self.budget("denoiser"), self.variant("denoiser", c)))
            if cfg.guard:
                out.append(Lineage("guard", c, stage_ids, self.budget("guard"), self.variant("guard", c)))
        if cfg.router and len(compartments) > 1:
            out.append(Lineage("router", None, self.data.stage_ids(None), self.budget("router"), self.variant("router", None)))
        return out

    def budget(self, kind: str) -> TrainConfig:
        """How a kind of model is trained now (a ready model trained with another budget is out of date)."""
        cfg = self.config
        return {"autoencoder": lambda: cfg.autoencoder.train_config(cfg.public_train.threads), "public-denoiser": lambda: cfg.public_train,
                "denoiser": lambda: cfg.train, "guard": cfg.guard_settings.train_config, "router": lambda: cfg.router_train}[kind]()

    def _same_budget(self, record: ModelRecord) -> bool:
        """Whether a checkpoint was trained with the kind's budget now (an imported base records none)."""
        return record.metadata.get("train") in (None, asdict(self.budget(record.kind)))

    def variant(self, kind: str, compartment: int | None) -> str:
        """The variant a model of this kind must carry to be current (see :class:`Lineage`)."""
        if kind == "denoiser" and compartment is not None and self.config.is_dp(compartment):
            return self._dp_variant()
        tags = [self._latent_tag() if KINDS[kind].latent_space else ""]
        if kind == "denoiser" and self.config.base is not None:
            base, rank = self.base(), self.config.lora_rank()
            tags.append(BASE_VARIANT_PREFIX + (base.metadata["weights_sha256"][:16] if base else "untrained") + ("" if rank is None else f"-lora{rank}"))
        if kind == "guard" and self.config.guard_settings.nonmember_weight:
            settings = self.config.guard_settings
            basis = f"{settings.nonmember_weight!r}|{settings.nonmembers}"
            tags.append(CALIBRATED_VARIANT_PREFIX + hashlib.sha256(basis.encode()).hexdigest()[:16])
        return "+".join(tag for tag in tags if tag)

    def base(self) -> ModelRecord | None:
        """The served public denoiser: the base every compartment's denoiser starts from (when the ward has one) and the
        model DP fine-tuning starts from."""
        return self.served("public-denoiser").get(None)

    def start_model(self, lineage: Lineage) -> ModelRecord | None:
        """The model a lineage's training starts from (None: fresh random weights): the base for a compartment's
        denoiser in a ward with a base, the public denoiser (if any) for DP fine-tuning."""
        if lineage.kind != "denoiser" or (self.config.base is None and not lineage.dp):
            return None
        return self.base()

    def _dp_variant(self) -> str:
        """Names the DP recipe: the DP config, the public model it starts from and the latent space (changing any retrains)."""
        public = self.base()
        basis = json.dumps(asdict(self.config.dp), sort_keys=True) + (public.metadata["weights_sha256"] if public else "scratch") + self._latent_tag()
        return DP_VARIANT_PREFIX + hashlib.sha256(basis.encode()).hexdigest()[:16]

    def _latent_tag(self) -> str:
        """"" for a pixel ward; "latent-<autoencoder weights hash>" for a latent one (a new autoencoder retrains every model)."""
        if not self.config.latent:
            return ""
        autoencoder = self.served("autoencoder").get(None)
        return LATENT_VARIANT_PREFIX + (autoencoder.metadata["weights_sha256"][:16] if autoencoder else "untrained")

    def _current(self, record: ModelRecord) -> bool:
        """Whether a ready checkpoint is of the current variant and fits the ward's structure."""
        kind = KINDS[record.kind]
        return (record.metadata.get("variant", "") == self.variant(record.kind, record.compartment) and kind.fits(record.metadata, self.context)
                and self._same_budget(record))

    def served(self, kind: str = "denoiser") -> dict[int | None, ModelRecord]:
        """Per compartment (None for a ward-wide kind), the newest current ready stage (it saw no forgotten ID)."""
        out: dict[int | None, ModelRecord] = {}
        for c in self.ledger.compartments() if KINDS[kind].per_compartment else [None]:
            records = [r for r in self.ledger.models(kind, c) if self._current(r)]
            if records:
                out[c] = records[-1]
        return out

    def ready_stages(self, lineage: Lineage) -> dict[int, ModelRecord]:
        """Stages of a lineage whose ready checkpoint was trained on exactly the IDs the stage should see now."""
        out = {}
        for record in self.ledger.models(lineage.kind, lineage.compartment):
            if not self._current(record):
                continue
            if record.stage < len(lineage.stage_ids) and record.ids_hash == ids_hash(lineage.stage_ids[record.stage]):
                out[record.stage] = record
        return out

    def plan(self, lineage: Lineage, from_scratch: bool = False) -> TrainJob | None:
        """What is missing in a lineage: a job that trains stages ``start``.. from the last matching checkpoint (None if up to date)."""
        ready = {} if from_scratch else self.ready_stages(lineage)
        start = 0
        while start in ready:
            start += 1
        if start == len(lineage.stage_ids):
            return None
        while start > 0 and not self._resumable(ready[start - 1]):
            start -= 1  # that stage retrains too, from the verified stage before it (or from the start)
        resume = None if start == 0 else ready[start - 1].path
        return TrainJob(str(self.path), lineage, start, resume)

    def _resumable(self, record: ModelRecord) -> bool:
        """Whether a stage's training state is the one written when it trained (a warning names it when not)."""
        try:
            check_files(self.path / record.path, record.metadata, [STATE_FILE])
        except DatawardError as error:
            where = "" if record.compartment is None else f" of compartment {record.compartment}"
            warnings.warn(f"not resuming from stage {record.stage} of the {record.kind}{where}: {error}; that stage retrains from the one before", stacklevel=3)
            return False
        return True

    def waves(self, only: tuple[str, ...] | None = None) -> Iterator[list[Lineage]]:
        """The lineages wave by wave in training order (:attr:`ModelKind.wave`), of the kinds in ``only``. Each wave is
        listed when the previous one is done: a new autoencoder or public denoiser changes the later waves' variants."""
        for wave in sorted({kind.wave for kind in KINDS.values()}):
            yield [l for l in self.lineages() if KINDS[l.kind].wave == wave and (only is None or l.kind in only)]

    def missing(self) -> bool:
        """Whether any model the ward should hold is missing or out of date."""
        return any(len(self.ready_stages(l)) < len(l.stage_ids) for l in self.lineages())

    def stale(self) -> list[int]:
        """Ready models that no longer fit the ward: routers after add, models of another recipe (DP on/off, another
        latent space or base, or none) or trained with another budget."""
        stale = [r.id for r in self.ledger.models("router", None) if not KINDS["router"].fits(r.metadata, self.context)]
        for lineage in self.lineages():
            stale += [r.id for r in self.ledger.models(lineage.kind, lineage.compartment)
                      if r.metadata.get("variant", "") != lineage.variant or not self._same_budget(r)]
        return stale

    def stage_count(self, record: ModelRecord) -> int:
        """Stages of the lineage a served model belongs to: DP models (they carry a privacy record) train in one phase,
        others in ``slices`` stages."""
        return 1 if "privacy" in record.metadata else self.config.slices

    def is_fallback(self, record: ModelRecord) -> bool:
        """Whether a served model is an earlier stage's checkpoint (its lineage is retraining after a forget)."""
        return record.stage < self.stage_count(record) - 1
