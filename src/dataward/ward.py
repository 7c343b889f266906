"""The ward: a directory holding one protected model family, and the Python API the CLI and the service wrap.

Layout: ``WARD/ward.json`` (:mod:`dataward.config`), ``WARD/ledger.sqlite`` or ``ledger.url`` (:mod:`dataward.store.ledger`),
``WARD/models/<name>/`` (a folder per trained stage: :mod:`dataward.store.checkpoints`), ``WARD/writer.lock``.

:class:`Ward` is a facade over :mod:`dataward.training.planner`, :mod:`dataward.training.runner` (here or on Ray),
:mod:`dataward.training.kinds`, :mod:`dataward.sampling`, :mod:`dataward.certificate` and :mod:`dataward.ward_status`. The
facade alone writes the ledger (registering, forgetting) and ward.json, and owns the cache of loaded models, which its
read side (:class:`dataward.sampling.served.ServedModels`, one per request) loads through.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dataward import ward_status
from dataward.assignment import check_layout, insert_samples
from dataward.public_base import base_config, import_base
from dataward.changes import TrainResult, WardChanges
from dataward.config import AssignBy, GuardConfig, TrainConfig, WardConfig, WeightsName
from dataward.data import Dataset, load_source
from dataward.diffusion.latent import LatentCodec
from dataward.diffusion.sampling import make_training_scheduler
from dataward.errors import DataChanged, DatawardError
from dataward.forgetting import ForgetResult
from dataward.sampling.plan import SampleRequest, SampleResult, generate
from dataward.sampling.served import ServedModels
from dataward.numerics import Numerics
from dataward.progress import ProgressOption, progress_display
from dataward.certificate import Certificate, forgetting_certificate
from dataward.store.checkpoints import MODELS_DIR, ModelCache, delete_quarantined, has_weights, remove_orphans
from dataward.store.database import LEDGER_FILE, check_ledger_url, ledger_location
from dataward.store.erasure import Eraser
from dataward.store.ledger import Ledger, ModelRecord
from dataward.store.lock import WriterBusy, WriterLock, staged
from dataward.store.move import switch_to_database
from dataward.training.executors import run_here, run_on_ray
from dataward.training.kinds import KINDS, KindContext
from dataward.training.planner import Lineage, Planner, TrainJob
from dataward.training.runner import JobRunner
from dataward.training.sources import WardData

TRAIN_ROUNDS = 3  # train() plans again while models are missing (forgets that landed meanwhile), at most this often

__all__ = ["Ward", "WardConfig", "WardHooks", "SampleResult", "ForgetResult", "TrainResult", "Lineage", "TrainJob", "AssignBy", "run_job_in_worker"]


@dataclass(frozen=True)
class WardHooks:
    """Callbacks a host (the HTTP service) attaches to a ward."""

    on_load: Callable[[ModelRecord], None] | None = None  # called each time a model is loaded or taken from the cache for use
    # called with a finished job's results just before they are registered; if it raises, nothing of the job is registered
    before_register: Callable[[TrainJob, list[dict]], None] | None = None


def run_job_in_worker(job: TrainJob, device: str, progress=None, report_to: str = "csv") -> list[dict]:
    """A training job in a worker process: open the ward at ``job.ward`` without touching its files, run the job, close
    (the ``work`` the Ray executor runs)."""
    ward = Ward.open(job.ward, worker=True)
    try:
        return ward.run_job(job, device, progress, report_to=report_to)
    finally:
        ward.close()


class Ward(WardChanges):
    """A protected model family on disk. Open with :meth:`Ward.open`, make with :meth:`Ward.create`."""

    def __init__(self, path: Path, config: WardConfig, ledger: Ledger, worker: bool = False, hooks: WardHooks | None = None,
                 config_stamp: str | None = None):
        self.path = path
        self.config_stamp = config_stamp  # ward.json as ``config`` was read from it (WardChanges.refresh_config)
        self.ledger = ledger
        self.hooks = hooks or WardHooks()
        self.scheduler = make_training_scheduler(config.num_train_timesteps, config.beta_schedule)
        self.cache = ModelCache(path)  # loaded models, kept across requests (the read side loads through it)
        self.writer = WriterLock(path)  # one writing process at a time (store/lock.py): train, forget's retraining, cleanup
        self.eraser = Eraser(ledger)  # physical erasure after a forget, in the background while a reader delays it
        self.config = config
        if not worker:
            self.eraser.erase()  # an earlier process's forget whose erasure a reader delayed
            delete_quarantined(path, ledger, self.cache)
            try:  # leftovers of a crash are removed by the writer only: another process's half-written checkpoint is not one
                with self.writer:
                    remove_orphans(path, ledger)
            except WriterBusy:
                pass

    @property
    def config(self) -> WardConfig:
        """The ward's config, re-read when another process saved ward.json. Assigning one takes effect at once (the planner
        and runner follow it); :meth:`reconfigure` also saves it."""
        self.refresh_config()
        return self._config

    @config.setter
    def config(self, config: WardConfig) -> None:
        self._config = config
        self.data = data = WardData(config, self.ledger)

        def served_models() -> ServedModels:  # the read side of this config's planner, as the ledger is at each call
            return ServedModels(planner, self.cache, self.hooks.on_load)

        # guards' non-members: a public data source's images as the models see them (latents in a latent ward)
        context = KindContext(config, self.scheduler, config.model_shape(), self.ledger,
                              lambda spec: served_models().model_data(data.public_source(spec)).images)
        self._planner = planner = Planner(self.path, config, self.ledger, data, context)
        self.runner = JobRunner(config, planner, data, context, served_models)

    @property
    def planner(self) -> Planner:
        """The planner of the ward's config as it is now in ward.json (every plan, report and sample starts here)."""
        self.refresh_config()
        return self._planner

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
        base: str | None = None,
        adapter: str = "full",
        public_train: TrainConfig | None = None,
        ledger_url: str | None = None,
    ) -> "Ward":
        """Make a new ward from a data source (spec string or Dataset); nothing is left behind on error. ``base``
        (:mod:`dataward.public_base`): public data to pretrain on (``printed:count=3000``), a ``UNet2DModel`` folder, or None
        (random weights); ``adapter``: ``full`` or ``lora:RANK``; ``public_train``: the public base's budget (40 epochs);
        ``ledger_url``: an empty PostgreSQL database for the ledger (replicas on several machines), else ``ledger.sqlite``."""
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise DatawardError(f"{path} already exists and is not empty: choose a new ward folder")
        check_layout(compartments, slices, by, numerics, adapter)
        if ledger_url is not None:
            check_ledger_url(ledger_url)
        base_fields = base_config(base)  # fails early on bad public data
        dataset = load_source(data) if isinstance(data, str) else data
        spec = data if isinstance(data, str) else "dataset"
        channels = channels or dataset.shape[0]
        config = WardConfig(
            data=spec, model=model, image_size=image_size, channels=channels,
            num_classes=dataset.num_classes if dataset.labels is not None else None, seed=seed, slices=slices, by=by,
            compartments=compartments, weights=weights, router=router, guard=guard, guard_settings=guard_settings or GuardConfig(),
            numerics=numerics, train=train or TrainConfig(), router_train=router_train or WardConfig.__dataclass_fields__["router_train"].default_factory(),
            **base_fields, adapter=adapter, public_train=public_train or WardConfig.__dataclass_fields__["public_train"].default_factory(),
        )
        with staged(path) as staging:  # nothing is left behind on error; a killed creation's folder is removed by the next
            (staging / MODELS_DIR).mkdir()
            ledger = Ledger(staging / LEDGER_FILE, create=True)
            ward = cls(staging, config, ledger)
            ward._denoiser_probe()  # fails early on a bad preset or size
            if config.base == "imported":
                import_base(staging, config, ledger, Path(base))
            config.save(staging)
            insert_samples(ledger, config, dataset.resized(image_size, channels), spec, new_compartments=compartments)
            ledger.close()
            if ledger_url is not None:
                switch_to_database(staging, ledger_url)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path, worker: bool = False, hooks: WardHooks | None = None) -> "Ward":
        """Open an existing ward. ``worker=True`` (training jobs in other processes) leaves its files alone; ``hooks``
        are the host's callbacks (see :class:`WardHooks`)."""
        path = Path(path)
        stamp = WardConfig.stamp(path)  # before reading it: a save in between is re-read at the first use
        return cls(path, WardConfig.load(path), Ledger(ledger_location(path)), worker, hooks, stamp)

    def close(self) -> None:
        """Stop background erasure (the next process that opens the ward resumes it) and close the ledger."""
        self.eraser.close()
        self.ledger.close()

    # data and models as the ward sees them --------------------------------------------------------------------------
    def training_data(self, compartment: int | None = None) -> Dataset:
        """The live (not forgotten) training samples, of one compartment or all."""
        return self.data.training_data(compartment)

    def heldout_data(self) -> Dataset | None:
        """The held-out reference set: digits' fixed held-out split for digits wards, else None."""
        return self.data.heldout_data()

    def compartments(self) -> list[int]:
        """All compartment IDs."""
        return self.ledger.compartments()

    def model_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the denoisers, router and guards see: the images, or the autoencoder's latents."""
        return self.config.model_shape()

    def codec(self) -> LatentCodec:
        """The served public autoencoder of a latent ward, with its scaling factor."""
        return self.read().codec()

    def model_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] as the models see them: unchanged, or encoded to scaled latents."""
        return self.read().model_inputs(images)

    def _denoiser_probe(self) -> torch.nn.Module:
        """A denoiser of the ward's preset and model shape (raises early when the preset cannot take that shape)."""
        return KINDS["denoiser"].build(self.planner.context, 0)

    # training -----------------------------------------------------------------------------------------------------
    def lineages(self) -> list[Lineage]:
        """Every model the ward should hold, with the IDs each stage trains on."""
        return self.planner.lineages()

    def plan(self, lineage: Lineage, from_scratch: bool = False) -> TrainJob | None:
        """What is missing in a lineage: a job that trains stages ``start``.. from the last matching checkpoint (None if up to date)."""
        return self.planner.plan(lineage, from_scratch)

    def run_job(self, job: TrainJob, device: str = "cpu", progress=None, out_root: Path | None = None, report_to: str = "csv") -> list[dict]:
        """Train a job's stages and write each checkpoint folder under ``out_root`` (default: the ward's models/, where a public
        model may come from the user's cache: :mod:`dataward.training.basecache`), with its loss log (``report_to``); one
        record per stage: ``{"stage", "folder", "ids", "metadata"}``. Reads the ledger, never writes it."""
        return self.runner.run(job, device, progress, out_root, report_to) if out_root else self.runner.run_cached(job, device, progress, report_to)

    def register(self, job: TrainJob, results: list[dict]) -> None:
        """Record a finished job's checkpoints in the ledger (the driver's part; one transaction per stage, in order),
        after ``hooks.before_register`` let them through."""
        if self.hooks.before_register is not None:
            self.hooks.before_register(job, results)
        for r in results:
            if not has_weights(self.path / MODELS_DIR / r["folder"]):
                raise DatawardError(f"checkpoint models/{r['folder']} vanished before it was registered (did another process open "
                                    f"this ward for writing while training ran?): run `dataward train {self.path}` again")
            self.ledger.register_model(job.lineage.kind, job.lineage.compartment, r["stage"], f"{MODELS_DIR}/{r['folder']}", r["ids"],
                                       r["metadata"]["ids_hash"], r["metadata"], public=KINDS[job.lineage.kind].public)

    def train(self, device: str = "cpu", progress: ProgressOption = True, executor: str = "local", only: tuple[str, ...] | None = None,
              report_to: str = "csv", **executor_options) -> TrainResult:
        """Train every model that is missing or out of date (after init, add, forget or a crash); finish pending forgets.

        Models train in waves (:attr:`dataward.training.kinds.ModelKind.wave`). ``executor``: ``local`` or ``ray`` (a Ray
        task per job); ``only``: some model kinds (``dataward pretrain``); ``progress``: True (stderr), False, or a display;
        ``report_to``: ``csv`` (each stage's ``loss.csv``) or ``none``. A signal stops training at the end of a step, the
        stage saved (:mod:`dataward.training.resume`). One writer at a time: else this raises :class:`WriterBusy`.
        """
        if executor not in ("local", "ray"):
            raise DatawardError(f"unknown executor {executor!r}: expected local or ray")
        started = time.time()
        work = functools.partial(run_job_in_worker if executor == "ray" else self.run_job, report_to=report_to)  # picklable for Ray
        execute = run_on_ray if executor == "ray" else run_here
        with self.writer, progress_display(progress) as shown:
            remove_orphans(self.path, self.ledger)
            for _ in range(TRAIN_ROUNDS):  # a forget accepted by another process while a round ran makes more work
                try:
                    for wave in self.planner.waves(only):
                        jobs = [job for job in (self.plan(l) for l in wave) if job is not None]
                        for job, results in execute(jobs, work, device=device, progress=shown, **executor_options):
                            self.register(job, results)
                except DataChanged:  # a forget landed in data a job was to train on: plan again with the live IDs
                    continue
                if only is not None or not self.models_missing():
                    break
        self.ledger.set_status(self.planner.stale(), "retired", "models-retired")
        pending = [r for r, _ in self.ledger.pending_forgets()]
        if pending and not self.models_missing():
            self.ledger.finish_forgets(pending)
        return TrainResult(seconds=time.time() - started, finished_forgets=pending)

    def models_missing(self) -> bool:
        """Whether any model the ward should hold is missing or out of date."""
        return self.planner.missing()

    # serving ------------------------------------------------------------------------------------------------------
    def read(self) -> ServedModels:
        """The models the ward serves now, for one request (:mod:`dataward.sampling.served`): the served record of each
        compartment per kind (read once), their models (``hooks.on_load`` sees every use), soups, denoisers, the codec."""
        return ServedModels(self.planner, self.cache, self.hooks.on_load)

    def served(self, kind: str = "denoiser") -> dict[int | None, ModelRecord]:
        """Per compartment (None for a ward-wide model such as the router), the newest ready stage that saw no forgotten ID."""
        return self.planner.served(kind)

    def model(self, record: ModelRecord) -> torch.nn.Module:
        """The model of a ledger record, in eval mode, loaded once and then taken from the cache (``hooks.on_load`` sees
        every call)."""
        return self.read().model(record)

    def soup(self, records: list[ModelRecord], shares: list[float]) -> torch.nn.Module:
        """One model averaging the given served models' weights by ``shares`` (``--weights soup``), made once per set."""
        return self.read().soup(records, shares)

    def drop_unready_models(self) -> None:
        """Drop cached models that are no longer ready in the ledger (quarantined, deleted or retired)."""
        self.cache.drop_unready(self.ledger)

    def sample(self, n: int, *, label: int | None = None, seed: int = 0, sampler: str | None = None, steps: int = 50,
               allowed: list[int] | None = None, weights: WeightsName | None = None, top_k: int | None = None, guard: bool = False,
               guard_scale: float | None = None, guard_alpha: float | None = None, progress=None, batched: bool = False) -> SampleResult:
        """Generate ``n`` images composed over the allowed compartments (all by default); see :mod:`dataward.sampling.plan`.
        ``batched``: a mixture's compartments in one vectorized call (equal within float tolerance; slower on CPU)."""
        request = SampleRequest(n, label, seed, sampler, steps, allowed, weights, top_k, guard, guard_scale, guard_alpha, batched)
        return generate(self.read(), request, progress)

    def serving_state(self) -> dict[str, str]:
        """Per compartment: what sampling uses right now (complete, a fallback stage, or left out)."""
        return ward_status.serving_state(self.planner)

    def verify(self, device: str = "cpu", progress=True, compartments: list[int] | None = None, retrain_base: bool = False) -> Certificate:
        """Forgetting certificate: retrain served models (all, or ``compartments``' and every joint model) from scratch on
        the live IDs and compare weight hashes; the public base is hash-checked against its record unless ``retrain_base``."""
        return forgetting_certificate(self.planner, self.runner, device, progress, compartments, retrain_public=retrain_base)

    # reports ------------------------------------------------------------------------------------------------------
    def privacy(self) -> dict | None:
        """(ε, δ) per DP compartment and for the ward (parallel composition: the max over disjoint compartments)."""
        return ward_status.privacy(self.planner)

    def status(self) -> ward_status.WardStatus:
        """Everything a user wants to know about the ward (``dataclasses.asdict`` of it is JSON-ready)."""
        return ward_status.status(self.planner)
