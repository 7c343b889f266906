"""The per-user cache of public models: a ward's base (the public denoiser) and a latent ward's public autoencoder.

A public model holds no private ID and is deterministic from its inputs (:func:`public_inputs`: its kind, public data
spec, the IDs and bytes it sees, architecture, seed, training budget, noise schedule, numerics and this machine's fingerprint,
device, and the code of dataward and its libraries), so a second ward that needs the same one copies it instead of
training it again (minutes for the 938-step base of a digits ward). Like a model hub's cache::

    $DATAWARD_CACHE (default $XDG_CACHE_HOME/dataward, else ~/.cache/dataward)
        bases/<sha256 of the inputs>/
            entry.json      the inputs, the weights hash, a sha256 of every file
            checkpoint/     the checkpoint folder as training wrote it (weights, training state, dataward.json)

A hit is copied into the ward and checked there, file by file and by weights hash, before it is used: a corrupt entry
is reported with a warning, trained again and replaced. Entries are written into a temporary folder and renamed into
place, so a reader never sees half an entry and concurrent writers are safe (one rename wins; both hold the same bytes).
The ward's bytes are the same with or without the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import diffusers
import torch

import dataward
from dataward import numerics
from dataward.config import CACHE_ENV, WardConfig, cache_root
from dataward.data import Dataset, ids_hash
from dataward.store.checkpoints import META_FILE, checkpoint_hash, file_sha256
from dataward.training.planner import Lineage

ENTRY_FILE = "entry.json"
CHECKPOINT_DIR = "checkpoint"


@lru_cache(maxsize=1)
def code_version() -> str:
    """A sha256 over dataward's source files: any change of its code (a new release, an edit of an editable install)
    may move bytes, so it starts fresh cache entries."""
    package = Path(dataward.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def data_digest(data: Dataset) -> str:
    """sha256 of a data set's images and labels as loaded (what a public data spec gave on this machine)."""
    digest = hashlib.sha256(data.images.contiguous().numpy().tobytes())
    digest.update(b"" if data.labels is None else data.labels.numpy().tobytes())
    return digest.hexdigest()


def public_inputs(config: WardConfig, lineage: Lineage, data: Dataset, device: str) -> dict:
    """Everything that decides a public model's bytes (its cache key is a hash of exactly this); ``data`` is the public
    data it trains on, in pixels at the ward's size."""
    inputs = {
        "kind": lineage.kind, "ids_hash": [ids_hash(ids) for ids in lineage.stage_ids], "data_sha256": data_digest(data), "train": asdict(lineage.config),
        "variant": lineage.variant, "seed": config.seed, "image_size": config.image_size, "channels": config.channels,
        "numerics": config.numerics, "machine": numerics.fingerprint(), "device": str(device),
        "code": {"dataward": dataward.__version__, "sources": code_version(), "torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    if lineage.kind == "autoencoder":
        return inputs | {"data": config.autoencoder_data, "autoencoder": asdict(config.autoencoder)}
    if lineage.kind != "public-denoiser":
        raise ValueError(f"{lineage.kind} is not a public model kind")
    latent = {"autoencoder": asdict(config.autoencoder), "data": config.autoencoder_data} if config.latent else None
    return inputs | {"data": config.public, "model": config.model, "num_classes": config.num_classes, "latent": latent,
                     "schedule": [config.num_train_timesteps, config.beta_schedule]}


def cache_key(inputs: dict) -> str:
    """The sha256 of a public model's inputs (its folder name in the cache)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by path relative to it."""
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _problem(folder: Path, entry: dict) -> str | None:
    """What is wrong with a copied cache entry's checkpoint ``folder`` (None: every file and the weights hash match)."""
    found = _file_digests(folder)
    if found != entry["files"]:
        changed = sorted(name for name in set(found) | set(entry["files"]) if found.get(name) != entry["files"].get(name))
        return f"file(s) {', '.join(changed)} differ from the entry's record"
    weights = checkpoint_hash(folder)
    if weights != entry["weights_sha256"] or json.loads((folder / META_FILE).read_text()).get("weights_sha256") != weights:
        return f"its weights hash {weights[:16]} is not the recorded {str(entry['weights_sha256'])[:16]}"
    return None


class PublicModelCache:
    """The ``bases/`` folder of the user's cache (:func:`cache_root`)."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_root() / "bases"

    def holds(self, key: str) -> bool:
        """Whether an entry for ``key`` exists (not yet checked: :meth:`fetch` checks it)."""
        return (self.root / key / ENTRY_FILE).is_file()

    def fetch(self, key: str, out_root: Path, prefix: str) -> tuple[str, dict] | None:
        """Copy the entry of ``key`` into ``out_root`` as a checkpoint folder ``<prefix>-<8 hex>`` (temp folder, checked,
        renamed): returns (folder name, metadata), or None on a miss or a corrupt entry (warned; train it again)."""
        entry_dir = self.root / key
        if not self.holds(key):
            return None
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        tmp = out_root / f".tmp-{name}"
        try:
            entry = json.loads((entry_dir / ENTRY_FILE).read_text())
            shutil.copytree(entry_dir / CHECKPOINT_DIR, tmp)
            problem = _problem(tmp, entry)
        except (OSError, ValueError, KeyError, TypeError) as error:
            problem = f"it cannot be read ({error})"
        if problem is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            warnings.warn(f"the cached public model {entry_dir} is corrupt ({problem}): training it again; the entry will be replaced",
                          stacklevel=2)
            return None
        metadata = json.loads((tmp / META_FILE).read_text())
        os.replace(tmp, out_root / name)
        return name, metadata

    def store(self, key: str, inputs: dict, folder: Path) -> None:
        """Fill the entry of ``key`` with a copy of the checkpoint ``folder`` just trained (replacing a corrupt one in one
        rename). A cache that cannot be written is warned about, never an error: it only saves time."""
        token = uuid.uuid4().hex[:8]
        tmp, old, final = self.root / f".tmp-{key}-{token}", self.root / f".old-{key}-{token}", self.root / key
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.copytree(folder, tmp / CHECKPOINT_DIR)
            entry = {"inputs": inputs, "weights_sha256": checkpoint_hash(tmp / CHECKPOINT_DIR), "files": _file_digests(tmp / CHECKPOINT_DIR)}
            (tmp / ENTRY_FILE).write_text(json.dumps(entry, indent=2, sort_keys=True))
            if final.exists():
                try:
                    os.rename(final, old)
                except OSError:
                    pass  # another writer moved it first
            os.rename(tmp, final)
        except OSError as error:
            if not (final / ENTRY_FILE).is_file():  # else another writer's entry won the rename: the same bytes
                warnings.warn(f"could not fill the cache of public models at {self.root} ({error}); set {CACHE_ENV} to a writable folder",
                              stacklevel=2)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
