"""Checkpoint folders under ``WARD/models/``: writing one atomically, hashing its weights, loading it, cleaning up.

One folder per trained stage::

    models/<kind>-c<compartment|all>-s<stage>-<8 hex>/
        config.json + diffusion_pytorch_model.safetensors   the EMA weights (diffusers ``save_pretrained``), or
        adapter_config.json + adapter_model.safetensors      a compartment's LoRA adapter on the ward's base
        train_state.safetensors                              raw weights, EMA, Adam: training resumes exactly (only in a
                                                             stage a forget can retrain from: not a lineage's last stage)
        loss.csv                                             the stage's loss by step (``train --report-to csv``)
        dataward.json                                        metadata (also in the ledger)

The ledger records the hash of the weights (``weights_sha256``) and of every other file a load or a resume reads
(``files_sha256``: config.json or adapter_config.json, train_state.safetensors); a file that differs is refused by name.

Only safetensors and JSON are ever read: no pickle is loaded from a ward.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dataward.errors import DatawardError
from dataward.store.ledger import Ledger, ModelRecord

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"  # a LoRA adapter's tensors (dataward.models.adapters): served as base + adapter
STATE_FILE = "train_state.safetensors"
META_FILE = "dataward.json"
MODELS_DIR = "models"
RESUME_DIR = "resume"  # in-stage checkpoints of stages in training (dataward.training.resume)


def weights_hash(path: Path) -> str:
    """SHA-256 over a safetensors file's tensors (names, dtypes, shapes, bytes), independent of file metadata."""
    tensors = load_file(str(path))
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def files_hashes(folder: Path) -> dict[str, str]:
    """``files_sha256`` of a checkpoint folder: the SHA-256 of each file that loading or resuming reads besides the
    served weights (``weights_sha256`` covers them) and the metadata."""
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir())
            if p.suffix in (".json", ".safetensors") and p.name != META_FILE and p != served_file(folder)}


def check_files(folder: Path, metadata: dict, names: list[str], missing_ok: bool = False) -> None:
    """Raise, naming the file, when one of ``names`` differs from the hash ``metadata["files_sha256"]`` recorded, or is
    missing unless ``missing_ok`` (a checkpoint written before these hashes were recorded has none: not checked)."""
    recorded = metadata.get("files_sha256", {})
    for name in names:
        path = folder / name
        if name in recorded and (not path.is_file() and not missing_ok or path.is_file() and file_sha256(path) != recorded[name]):
            raise DatawardError(f"{path} is not the file written when this model was trained (its SHA-256 is not the one the "
                                f"ledger recorded: changed, replaced or missing); restore it from a backup, or retrain the ward into a new folder")


def folder_prefix(kind: str, compartment: int | None) -> str:
    """The start of every checkpoint folder name of one lineage (the stage number follows)."""
    return f"{kind}-c{'all' if compartment is None else compartment}-s"


class SavedState(Protocol):
    """What a checkpoint keeps to continue training: :class:`dataward.training.loop.TrainState` (the store sits below
    training, so it names only the one method it calls)."""

    def save(self, path: Path) -> None:
        """Write the state to one file."""


def write_checkpoint(out_root: Path, prefix: str, model: torch.nn.Module, state: SavedState | None, metadata: Callable[[str], dict],
                     files: dict[str, Path] | None = None) -> tuple[str, dict]:
    """Write a checkpoint folder ``<prefix>-<8 hex>`` under ``out_root`` atomically (a temp folder, then a rename):
    ``model`` (holding the weights to serve), ``state`` (None: a stage no training resumes from), ``metadata(weights_sha256)``
    and ``files`` (copied in: {name in the folder: file}). Returns (folder name, metadata)."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    tmp = out_root / f".tmp-{name}"
    model.save_pretrained(str(tmp), safe_serialization=True)
    if state is not None:
        state.save(tmp / STATE_FILE)
    for file_name, source in (files or {}).items():
        shutil.copyfile(source, tmp / file_name)
    meta = metadata(weights_hash(served_file(tmp))) | {"files_sha256": files_hashes(tmp)}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, out_root / name)
    return name, meta


def served_file(folder: Path) -> Path:
    """The file of a checkpoint folder that the ledger's hash covers: the adapter of a LoRA compartment, else the weights."""
    return folder / ADAPTER_FILE if (folder / ADAPTER_FILE).is_file() else folder / WEIGHTS_FILE


def has_weights(folder: Path) -> bool:
    """Whether a checkpoint folder holds its weights (or adapter) file."""
    return served_file(folder).is_file()


def checkpoint_hash(folder: Path) -> str:
    """:func:`weights_hash` of a checkpoint folder's served weights (or adapter)."""
    return weights_hash(served_file(folder))


def state_file(folder: Path) -> Path:
    """The training state (resumes exactly) of a checkpoint folder."""
    return folder / STATE_FILE


class ModelCache:
    """The models of a ward's ledger records, each loaded once (eval mode), kept across requests."""

    def __init__(self, ward: Path):
        self.ward = ward
        self.models: dict[int, torch.nn.Module] = {}
        self.derived_models: dict[tuple[str, tuple[int, ...]], object] = {}  # made from loaded models (soups, stacks): (what, their IDs)

    def get(self, record: ModelRecord, load: Callable[[ModelRecord, Path], torch.nn.Module]) -> torch.nn.Module:
        """The model of ``record``, loaded on first use by ``load(record, folder)`` (diffusers ``from_pretrained`` with
        safetensors, or base + adapter: :meth:`dataward.sampling.served.ServedModels.load`) after checking its weights
        against the hash the ledger recorded."""
        if record.id not in self.models:
            folder = self.ward / record.path
            read = [name for name in record.metadata.get("files_sha256", {}) if name != STATE_FILE]
            check_files(folder, record.metadata, read, missing_ok=True)  # a missing file: the load below names it
            try:
                found = checkpoint_hash(folder)
                model = load(record, folder)
            except (OSError, ValueError, RuntimeError, SafetensorError) as error:
                raise DatawardError(f"cannot load model {record.kind} from {folder}: {error}") from None
            recorded = record.metadata.get("weights_sha256")
            if found != recorded:
                where = "" if record.compartment is None else f" of compartment {record.compartment}"
                raise DatawardError(f"refusing to load the {record.kind}{where} from {folder}: its weights hash {found[:16]} is not the "
                                    f"{str(recorded)[:16]} the ledger recorded when it was trained (the file was changed or replaced); "
                                    f"restore it from a backup, or retrain the ward into a new folder")
            self.models[record.id] = model.eval()
        return self.models[record.id]

    def derived(self, what: str, model_ids: tuple[int, ...], make: Callable[[], object]) -> object:
        """Something made from the models of ``model_ids`` (their soup, their stacked weights): made once, dropped with
        any of them."""
        key = (what, model_ids)
        if key not in self.derived_models:
            self.derived_models[key] = make()
        return self.derived_models[key]

    def drop(self, model_ids: list[int]) -> None:
        """Forget the loaded models of ``model_ids`` and every model derived from them (those not loaded are ignored)."""
        for model_id in model_ids:
            self.models.pop(model_id, None)
        for key in [k for k in self.derived_models if set(k[1]) & set(model_ids)]:
            del self.derived_models[key]

    def drop_unready(self, ledger: Ledger) -> None:
        """Forget the loaded models that are no longer ready in ``ledger`` (quarantined, deleted or retired)."""
        loaded = set(self.models) | {m for _, ids in self.derived_models for m in ids}
        ready = ledger.ready_models(list(loaded))
        self.drop([m for m in loaded if m not in ready])


def delete_quarantined(ward: Path, ledger: Ledger, cache: ModelCache) -> None:
    """Delete the files of quarantined models (they saw forgotten IDs) and mark them deleted; the ledger keeps their record."""
    quarantined = ledger.models(status="quarantined", any_compartment=True)
    for record in quarantined:
        shutil.rmtree(ward / record.path, ignore_errors=True)
    cache.drop([r.id for r in quarantined])
    ledger.set_status([r.id for r in quarantined], "deleted", "models-deleted")


def remove_orphans(ward: Path, ledger: Ledger) -> None:
    """Remove model folders no ledger record owns: leftovers of a crash between writing and registering."""
    kept = {r.path for r in ledger.models(status=None, any_compartment=True) if r.status in ("ready", "retired")}
    models_dir = ward / MODELS_DIR
    if models_dir.is_dir():
        for child in models_dir.iterdir():
            if f"{MODELS_DIR}/{child.name}" not in kept:
                shutil.rmtree(child, ignore_errors=True)


def drop_train_states(ward: Path, ledger: Ledger, stages: Callable[[ModelRecord], int]) -> None:
    """Remove the training state of every registered model no forget or resume can start from: a retired model, or the
    last of its lineage's ``stages(record)`` stages (a forget retrains from the stage before the forgotten ID's slice).
    Folders no record owns yet (a job's, before it is registered) are left alone."""
    for record in ledger.models(status=None, any_compartment=True):
        if record.status == "retired" or (record.status == "ready" and record.stage >= stages(record) - 1):
            state_file(ward / record.path).unlink(missing_ok=True)


def disk_use(ward: Path) -> dict[str, int]:
    """Bytes the ward folder holds on disk: ``total`` (every file: ledger.sqlite, models, in-stage checkpoints, ...),
    ``models`` (the checkpoint folders), ``train_states`` (the training states in them: only stages a forget can
    retrain from keep one) and ``resume`` (in-stage checkpoints and loss logs of stages in training)."""
    sizes = {"total": 0, "models": 0, "train_states": 0, "resume": 0}
    for file in ward.rglob("*"):
        if not file.is_file():
            continue
        size = file.stat().st_size
        parts = file.relative_to(ward).parts
        sizes["total"] += size
        if parts[0] in (MODELS_DIR, RESUME_DIR):
            sizes["models" if parts[0] == MODELS_DIR else "resume"] += size
        if parts[0] == MODELS_DIR and file.name == STATE_FILE:
            sizes["train_states"] += size
    return sizes
