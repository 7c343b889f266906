"""The job runner: trains a :class:`~dataward.training.planner.TrainJob`'s stages and writes their checkpoint folders.

It reads the ledger and never writes it, so it runs in the driver or in a worker process alike
(:mod:`dataward.training.executors`); the driver registers what it returns. Determinism does not depend on where it
runs: each stage seeds its own generators from (ward seed, kind, compartment, stage) and the job sets the torch thread
count and kernels from its config (:func:`configure_torch`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Protocol

import torch

import dataward
from dataward import numerics
from dataward.config import WardConfig
from dataward.data import Dataset, ids_hash
from dataward.errors import DataChanged
from dataward.interrupts import DeferredSignals, Interrupted
from dataward.models.adapters import AdapterCheckpoint, add_lora
from dataward.models.nets import derive_seed
from dataward.progress import progress_task
from dataward.store.checkpoints import MODELS_DIR, RESUME_DIR, drop_train_states, folder_prefix, state_file, write_checkpoint
from dataward.store.ledger import ModelRecord
from dataward.training.basecache import PublicModelCache, cache_key, public_inputs
from dataward.training.dp import dp_finetune
from dataward.training.kinds import KINDS, KindContext
from dataward.training.loop import ShuffledBatches, TrainState, train_batches
from dataward.training.losslog import LOSS_FILE, LossLog, ReportTo, check_report_to
from dataward.training.planner import Lineage, Planner, TrainJob
from dataward.training.privacy import other_accountant, plan_dp
from dataward.training.resume import CheckpointedSteps, StageCheckpoint, stage_name, stage_spec, sweep
from dataward.training.sources import WardData


def configure_torch(device: str, threads: int) -> None:
    """Set what determinism needs in this process before a job trains: the intra-op thread count and, on CUDA,
    deterministic kernels (cuBLAS workspace, no cuDNN autotuning)."""
    torch.set_num_threads(threads)
    if torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS makes its handle
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)


class LoadedModels(Protocol):
    """How a runner loads the models it starts from (the read side, :class:`dataward.sampling.served.ServedModels`)."""

    def model(self, record: ModelRecord) -> torch.nn.Module:
        """The model of a ledger record (the base a compartment fine-tunes from, the public model DP starts from)."""

    def model_data(self, data: Dataset) -> Dataset:
        """A dataset as the models see it (latents of the served autoencoder in a latent ward)."""


class JobRunner:
    """Trains jobs of one ward. ``models()`` gives the ward's served models as they are at each call (the public models
    DP and LoRA start from, the autoencoder whose latents the models see)."""

    def __init__(self, config: WardConfig, planner: Planner, data: WardData, context: KindContext, models: Callable[[], LoadedModels]):
        self.config = config
        self.planner = planner
        self.data = data
        self.context = context
        self.models = models

    def stage_data(self, lineage: Lineage, stage: int) -> Dataset:
        """The examples one stage trains on, checked against the plan (sorted by ID), as the model sees them."""
        source = KINDS[lineage.kind].data
        if source == "autoencoder":
            return self.data.autoencoder_data()
        if source == "public":
            return self.models().model_data(self.data.public_data())
        data = self.data.dataset(self.data.ledger.samples(lineage.compartment, max_slice=stage if len(lineage.stage_ids) > 1 else None))
        if data.ids != lineage.stage_ids[stage]:
            raise DataChanged(f"a forget changed the data of {lineage.kind} {lineage.compartment} stage {stage} before it trained")
        return self.models().model_data(data)

    def run(self, job: TrainJob, device: str = "cpu", progress=None, out_root: Path | None = None, report_to: ReportTo = "csv") -> list[dict]:
        """Train a job's stages and write each checkpoint folder under ``out_root`` (default: the ward's models/), with
        its loss log unless ``report_to`` is ``none``. An interrupted stage continues from its in-stage checkpoint
        (:mod:`dataward.training.resume`); the job's in-stage files are removed once every stage's folder is written.

        Returns one record per stage: ``{"stage", "folder", "ids", "metadata"}``.
        """
        check_report_to(report_to)
        lineage = job.lineage
        models = self.planner.path / MODELS_DIR
        out_root = Path(out_root or models)
        work = out_root / RESUME_DIR  # in-progress files: a scratch root's own, or the ward's
        if out_root.resolve() == models.resolve():
            work = self.planner.path / RESUME_DIR
            self._tidy(work)
        configure_torch(device, lineage.config.threads)  # thread count (and deterministic CUDA kernels): part of determinism
        numerics.require(self.config.numerics)  # ... and the CPU kernels
        if lineage.dp:
            checkpoint = StageCheckpoint(work, lineage, 0, stage_spec(lineage, 0, self.config.seed, self.config.numerics))
            result = self._run_dp(lineage, device, progress, out_root, checkpoint, report_to == "csv")
            checkpoint.remove()
            return [result]
        state = TrainState.fresh(self._build(lineage).to(device), lineage.config)
        if job.resume_from is not None:
            if not state_file(self.planner.path / job.resume_from).is_file():  # quarantined by a forget since the plan
                raise DataChanged(f"a forget removed the checkpoint {job.resume_from} that {lineage.kind} {lineage.compartment} resumes from")
            state.load(state_file(self.planner.path / job.resume_from))
        stages = len(lineage.stage_ids)
        name = lineage.kind + ("" if lineage.compartment is None else f" {lineage.compartment}")
        update = progress_task(progress, f"train {name}", sum(lineage.stage_steps(r) for r in range(job.start, stages)))

        def advance(steps: int, stage: int, loss: float | None) -> None:
            update(steps, **({} if loss is None else {"description": f"train {name} stage {stage} (0..{stages - 1}) loss {loss:.3f}"}))

        results, checkpoints = [], []
        with DeferredSignals() as signals:  # a signal stops training at the end of a step, once the stage is saved
            for stage in range(job.start, stages):
                checkpoint = StageCheckpoint(work, lineage, stage, stage_spec(lineage, stage, self.config.seed, self.config.numerics))
                checkpoints.append(checkpoint)
                log = checkpoint.path.with_suffix(".csv") if report_to == "csv" else None
                try:
                    data, targets = self._train_stage(lineage, stage, state, checkpoint, log, signals, device, functools.partial(advance, stage=stage))
                except DataChanged as changed:  # the stages trained so far are still exact for the IDs they saw
                    raise DataChanged(str(changed), results) from None
                extra = KINDS[lineage.kind].describe(self.context, state, data, targets, stage)
                results.append(self._save_stage(lineage, stage, lineage.stage_ids[stage], state, out_root, extra, {} if log is None else {LOSS_FILE: log}))
        for checkpoint in checkpoints:  # kept until here: a job stopped after writing some stages redoes none of them
            checkpoint.remove()
            checkpoint.path.with_suffix(".csv").unlink(missing_ok=True)
        return results

    def _tidy(self, work: Path) -> None:
        """Remove what no stage can start from any more: in-progress files of no current stage (e.g. of one that saw an ID
        forgotten since), and the training state of retired models and of each lineage's last stage (public models and
        DP's one phase have one stage)."""
        lineages = self.planner.lineages()
        sweep(work, {stage_name(l, r): stage_spec(l, r, self.config.seed, self.config.numerics) for l in lineages for r in range(len(l.stage_ids))})
        drop_train_states(self.planner.path, self.planner.ledger,
                          lambda record: 1 if KINDS[record.kind].public else self.planner.stage_count(record))

    def _train_stage(self, lineage: Lineage, stage: int, state: TrainState, checkpoint: StageCheckpoint, log_path: Path | None,
                     signals: DeferredSignals, device: str, on_step: Callable[..., None]) -> tuple[Dataset, torch.Tensor | None]:
        """Train one stage from its in-stage checkpoint (if one of its spec is there) or from ``state``; save an in-stage
        checkpoint every :data:`~dataward.training.resume.CHECKPOINT_SECONDS`, at the stage's end and when a signal
        stops it (then deliver the signal, noting where the stage stands). ``on_step(steps, loss=)`` sees the progress (loss
        None for the steps a checkpoint restored). Returns the stage's data and targets."""
        ids, steps = lineage.stage_ids[stage], lineage.stage_steps(stage)
        data = self.stage_data(lineage, stage)
        loss, targets = KINDS[lineage.kind].objective(self.context, ids)
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, lineage.kind, lineage.compartment, "stage", stage))
        start = checkpoint.load(state)
        if start is not None and start.done:
            on_step(start.done, loss=None)
        batches = ShuffledBatches(data, lineage.config.batch_for(len(data)), steps, generator, targets, device, start)
        log = LossLog(log_path, 0 if start is None else start.done)
        where = f"{lineage.kind}{'' if lineage.compartment is None else f' {lineage.compartment}'} stage {stage} (0..{len(lineage.stage_ids) - 1})"
        saving = CheckpointedSteps(checkpoint, signals, steps, where)

        def step_done(value: float) -> None:
            on_step(1, loss=value)
            log.write(batches.done, state.step, value, lineage.config.lr)
            saving.after_step(state, batches.cursor, batches.done, log.close)

        try:
            train_batches(state, batches, loss, generator, on_step=step_done)
        finally:
            log.close()
        return data, targets

    def run_cached(self, job: TrainJob, device: str = "cpu", progress=None, report_to: ReportTo = "csv") -> list[dict]:
        """:meth:`run` into the ward's models/, except that a public model (the base, a latent ward's autoencoder) trained
        before with the same inputs is copied from the user's cache (:mod:`dataward.training.basecache`), its hashes
        checked; one trained here fills the cache. The ward's bytes are the same either way."""
        lineage = job.lineage
        if not KINDS[lineage.kind].public:
            return self.run(job, device, progress, None, report_to)
        key, inputs = self.public_key(lineage, device)
        cache, out_root = PublicModelCache(), self.planner.path / MODELS_DIR
        hit = cache.fetch(key, out_root, folder_prefix(lineage.kind, None) + "0")
        if hit is None:
            results = self.run(job, device, progress, None, report_to)
            cache.store(key, inputs, out_root / results[-1]["folder"])
            return results
        progress_task(progress, f"{lineage.kind}: copied from the cache of public models (hashes checked)", 1)(1)
        return [{"stage": 0, "folder": hit[0], "ids": list(lineage.stage_ids[0]), "metadata": hit[1]}]

    def public_key(self, lineage: Lineage, device: str) -> tuple[str, dict]:
        """A public lineage's key in the cache of public models, and the inputs it hashes."""
        data = self.data.autoencoder_data() if KINDS[lineage.kind].data == "autoencoder" else self.data.public_data()
        inputs = public_inputs(self.config, lineage, data, device)
        return cache_key(inputs), inputs

    def _build(self, lineage: Lineage) -> torch.nn.Module:
        """A lineage's model before its first step: a copy of the model it starts from (the ward's base), or fresh weights."""
        start = self.planner.start_model(lineage)
        rank = self.config.lora_rank()
        if start is not None and rank is not None:
            return add_lora(self.models().model(start), rank, derive_seed(self.config.seed, lineage.kind, lineage.compartment, "lora")).train()
        if start is not None:
            return copy.deepcopy(self.models().model(start)).train()
        return KINDS[lineage.kind].build(self.context, derive_seed(self.config.seed, lineage.kind, lineage.compartment, "init"))

    def _run_dp(self, lineage: Lineage, device: str, progress, out_root: Path, checkpoint: StageCheckpoint, log_csv: bool) -> dict:
        """DP-SGD fine-tuning of one compartment's denoiser from the public model (DP-LDM), or from scratch (DPDM-style),
        with its loss log beside ``checkpoint`` (when ``log_csv``). It continues from ``checkpoint`` (its state, its
        generators and its accountant's history: the same bytes and ε as an uninterrupted run) and saves it as other
        stages do; with ``secure_rng`` it keeps none (that randomness cannot be saved) and an interrupted run restarts."""
        data = self.stage_data(lineage, 0)
        model = self._build(lineage)
        public = self.planner.start_model(lineage)
        dp = self.config.dp
        plan = plan_dp(dp, len(data), model)
        log_path = checkpoint.path.with_suffix(".csv") if log_csv else None
        done = 0 if dp.secure_rng else checkpoint.steps_done()
        update = progress_task(progress, f"DP fine-tune {lineage.compartment}", plan.steps)
        update(done)
        log, steps = LossLog(log_path, done), [done]

        def step_done(value: float) -> None:
            steps[0] += 1
            update(1, description=f"DP fine-tune {lineage.compartment} (ε={dp.epsilon})")
            log.write(steps[0], steps[0], value, dp.learning_rate())

        where = f"DP fine-tuning of compartment {lineage.compartment}"
        with contextlib.nullcontext() if dp.secure_rng else DeferredSignals() as signals:
            try:
                state, record = dp_finetune(
                    model.to(device), data, dp, lineage.config, seed=derive_seed(self.config.seed, "dp", lineage.compartment), scheduler=self.context.scheduler,
                    calibration=None if public is None or self.config.public is None else self.models().model_data(self.data.public_data()),
                    device=device, on_step=step_done, saving=None if dp.secure_rng else CheckpointedSteps(checkpoint, signals, plan.steps, where),
                    public=self.config.public,
                )
            except (KeyboardInterrupt, Interrupted) as stop:
                if dp.secure_rng:
                    stop.add_note(f"{where} restarts from its first step (secure_rng: its randomness cannot be saved)")
                raise
            finally:
                log.close()
        result = self._save_stage(lineage, 0, lineage.stage_ids[0], state, out_root, {"privacy": record.to_dict(check_accountant=other_accountant(dp.accountant))},
                                  {} if log_path is None else {LOSS_FILE: log_path})
        if log_path is not None:
            log_path.unlink()
        return result

    def _save_stage(self, lineage: Lineage, stage: int, ids: tuple[str, ...], state: TrainState, out_root: Path, extra: dict,
                    files: dict[str, Path] | None = None) -> dict:
        """Write one stage's checkpoint folder: its EMA weights, or its adapter alone (the base is stored once); the training
        state only where a forget can retrain from it (not a lineage's last stage, nor DP's one phase: a forget retrains
        from the stage before the forgotten ID's slice); metadata, with the base's hash and the adapter's rank when the
        lineage started from the base; ``files`` (the loss log)."""
        model, start, rank = state.ema_model(), self.planner.start_model(lineage), self.config.lora_rank()
        origin = {} if start is None else {"base_sha256": start.metadata["weights_sha256"]} | ({} if rank is None else {"lora_rank": rank})
        if "lora_rank" in origin:
            model = AdapterCheckpoint(model, rank)

        def metadata(weights_sha256: str) -> dict:
            return {
                "kind": lineage.kind, "compartment": lineage.compartment, "stage": stage, "ids_hash": ids_hash(ids),
                "num_ids": len(ids), "seed": self.config.seed, "steps": state.step, "train": asdict(lineage.config),
                "dataward_version": dataward.__version__, "weights_sha256": weights_sha256, "numerics": numerics.fingerprint(),
            } | origin | KINDS[lineage.kind].structure(self.context) | {"variant": lineage.variant} | extra

        resumable = not lineage.dp and stage < len(lineage.stage_ids) - 1
        folder, meta = write_checkpoint(out_root, folder_prefix(lineage.kind, lineage.compartment) + str(stage), model, state if resumable else None,
                                        metadata, files)
        return {"stage": stage, "folder": folder, "ids": list(ids), "metadata": meta}
