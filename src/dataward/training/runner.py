"""The job runner: trains a :class:`~dataward.training.planner.TrainJob`'s stages and writes their checkpoint folders.

It reads the ledger and never writes it, so it runs in the driver or in a worker process alike
(:mod:`dataward.training.executors`); the driver registers what it returns. Determinism does not depend on where it
runs: each stage seeds its own generators from (ward seed, kind, compartment, stage) and the job sets the torch thread
count and kernels from its config (:func:`configure_torch`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

import dataward
from dataward import numerics
from dataward.config import WardConfig
from dataward.data import Dataset, ids_hash
from dataward.diffusion.latent import LatentCodec
from dataward.errors import DatawardError
from dataward.models.adapters import AdapterCheckpoint, add_lora
from dataward.models.kinds import KINDS, KindContext
from dataward.models.nets import derive_seed
from dataward.progress import progress_task
from dataward.store.checkpoints import MODELS_DIR, folder_prefix, state_file, write_checkpoint
from dataward.store.ledger import ModelRecord
from dataward.training.dp import dp_finetune
from dataward.training.loop import TrainState, run_steps
from dataward.training.planner import Lineage, Planner, TrainJob
from dataward.training.privacy import other_accountant, plan_dp
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


class JobRunner:
    """Trains jobs of one ward. ``load`` gives the model of a ledger record (the public models DP and latents start from)."""

    def __init__(self, config: WardConfig, planner: Planner, data: WardData, context: KindContext, load: Callable[[ModelRecord], torch.nn.Module]):
        self.config = config
        self.planner = planner
        self.data = data
        self.context = context
        self.load = load
        self.latent_codec: tuple[int, LatentCodec] | None = None  # (autoencoder model id, codec), loaded once

    def codec(self) -> LatentCodec:
        """The served public autoencoder of a latent ward, with its scaling factor."""
        path = self.planner.path
        if not self.config.latent:
            raise DatawardError("this ward works in pixel space: it has no autoencoder (pretrain with --latent for one)")
        record = self.planner.served("autoencoder").get(None)
        if record is None:
            raise DatawardError(f"this latent ward has no trained autoencoder: run `dataward pretrain {path} --latent`")
        if self.latent_codec is None or self.latent_codec[0] != record.id:
            self.latent_codec = (record.id, LatentCodec(self.load(record), float(record.metadata["scaling_factor"]), self.config.autoencoder))
        return self.latent_codec[1]

    def model_data(self, data: Dataset) -> Dataset:
        """A dataset as the models see it (the same IDs and labels; latents in a latent ward)."""
        return self.codec().encode_dataset(data) if self.config.latent else data

    def stage_data(self, lineage: Lineage, stage: int) -> Dataset:
        """The examples one stage trains on, checked against the plan (sorted by ID), as the model sees them."""
        source = KINDS[lineage.kind].data
        if source == "autoencoder":
            return self.data.autoencoder_data()
        if source == "public":
            return self.model_data(self.data.public_data())
        data = self.data.dataset(self.data.ledger.samples(lineage.compartment, max_slice=stage if len(lineage.stage_ids) > 1 else None))
        if data.ids != lineage.stage_ids[stage]:
            raise DatawardError(f"the ward's data changed while training {lineage.kind} {lineage.compartment} stage {stage}: run `dataward train` again")
        return self.model_data(data)

    def run(self, job: TrainJob, device: str = "cpu", progress=None, out_root: Path | None = None) -> list[dict]:
        """Train a job's stages and write each checkpoint folder under ``out_root`` (default: the ward's models/).

        Returns one record per stage: ``{"stage", "folder", "ids", "metadata"}``.
        """
        lineage = job.lineage
        out_root = Path(out_root or self.planner.path / MODELS_DIR)
        configure_torch(device, lineage.config.threads)  # thread count (and deterministic CUDA kernels): part of determinism
        numerics.require(self.config.numerics)  # ... and the CPU kernels
        if lineage.dp:
            return [self._run_dp(lineage, device, progress, out_root)]
        kind = KINDS[lineage.kind]
        state = TrainState.fresh(self._build(lineage).to(device), lineage.config)
        if job.resume_from is not None:
            state.load(state_file(self.planner.path / job.resume_from))
        stages = len(lineage.stage_ids)
        name = lineage.kind + ("" if lineage.compartment is None else f" {lineage.compartment}")
        update = progress_task(progress, f"train {name}", sum(lineage.stage_steps(r) for r in range(job.start, stages)))
        results = []
        for stage in range(job.start, stages):
            ids = lineage.stage_ids[stage]
            data = self.stage_data(lineage, stage)
            loss, targets = kind.objective(self.context, ids)
            generator = torch.Generator().manual_seed(derive_seed(self.config.seed, lineage.kind, lineage.compartment, "stage", stage))
            run_steps(state, data, loss, lineage.stage_steps(stage), lineage.config, generator, targets, device,
                      on_step=lambda value: update(1, description=f"train {name} stage {stage} (0..{stages - 1}) loss {value:.3f}"))
            results.append(self._save_stage(lineage, stage, ids, state, out_root, kind.describe(self.context, state, data, targets, stage)))
        return results

    def _build(self, lineage: Lineage) -> torch.nn.Module:
        """A lineage's model before its first step: a copy of the model it starts from (the ward's base), or fresh weights."""
        start = self.planner.start_model(lineage)
        rank = self.config.lora_rank()
        if start is not None and rank is not None:
            return add_lora(self.load(start), rank, derive_seed(self.config.seed, lineage.kind, lineage.compartment, "lora")).train()
        if start is not None:
            return copy.deepcopy(self.load(start)).train()
        return KINDS[lineage.kind].build(self.context, derive_seed(self.config.seed, lineage.kind, lineage.compartment, "init"))

    def _run_dp(self, lineage: Lineage, device: str, progress, out_root: Path) -> dict:
        """DP-SGD fine-tuning of one compartment's denoiser from the public model (DP-LDM), or from scratch (DPDM-style)."""
        data = self.stage_data(lineage, 0)
        model = self._build(lineage)
        public = self.planner.start_model(lineage)
        dp = self.config.dp
        plan = plan_dp(dp, len(data), model)
        update = progress_task(progress, f"DP fine-tune {lineage.compartment}", plan.steps)
        state, record = dp_finetune(
            model.to(device), data, dp, lineage.config, seed=derive_seed(self.config.seed, "dp", lineage.compartment), scheduler=self.context.scheduler,
            calibration=None if public is None or self.config.public is None else self.model_data(self.data.public_data()),
            device=device, on_step=lambda value: update(1, description=f"DP fine-tune {lineage.compartment} (ε={dp.epsilon})"),
            public=self.config.public,
        )
        return self._save_stage(lineage, 0, lineage.stage_ids[0], state, out_root, {"privacy": record.to_dict(check_accountant=other_accountant(dp.accountant))})

    def _save_stage(self, lineage: Lineage, stage: int, ids: tuple[str, ...], state: TrainState, out_root: Path, extra: dict) -> dict:
        """Write one stage's checkpoint folder (its EMA weights, or its adapter alone: the base is stored once; training
        state; metadata, with the base's hash and the adapter's rank when the lineage started from the base)."""
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

        folder, meta = write_checkpoint(out_root, folder_prefix(lineage.kind, lineage.compartment) + str(stage), model, state, metadata)
        return {"stage": stage, "folder": folder, "ids": list(ids), "metadata": meta}
