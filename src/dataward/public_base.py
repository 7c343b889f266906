"""A ward's base: the public denoiser every compartment's denoiser is fine-tuned from (CDM composes fine-tuned models).

A base holds no private ID, so a forget never retrains it and ``verify`` stays exact. It is either

- ``public``: trained by the ward itself on public data (``WardConfig.public``, e.g. ``printed:count=3000``) before the
  compartments (the ``public-denoiser`` kind, wave 1), or
- ``imported``: a diffusers ``UNet2DModel`` folder the user already has (``save_pretrained`` output, safetensors only),
  copied into the ward once, its hash and config recorded in the ledger; it must fit the ward's images and classes.

Compartments then train a delta on it: every weight (``adapter="full"``) or a low-rank adapter (``lora:RANK``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from diffusers import UNet2DModel

from dataward.config import WardConfig
from dataward.data import load_source
from dataward.errors import DatawardError
from dataward.store.checkpoints import META_FILE, MODELS_DIR, WEIGHTS_FILE, files_hashes, folder_prefix, weights_hash
from dataward.store.ledger import Ledger

AUTO = "auto"
DEFAULT_PUBLIC_BASE = "printed:count=3000"  # printed digits in many typefaces: public, and the closest to handwritten digits


def choose_base(base: str | None, data: str) -> str | None:
    """What ``--base`` means for a ward of ``data``: ``auto`` is the printed-digits base for digits wards and none
    otherwise; ``none`` is none; anything else (a public data spec or a folder) is kept."""
    if base is None or base == "none":
        return None
    if base == AUTO:
        return DEFAULT_PUBLIC_BASE if data.split(":", 1)[0] == "digits" else None
    return base


def is_folder(base: str) -> bool:
    """Whether a base names a diffusers model folder (else it is a public data spec)."""
    return Path(base).is_dir()


def base_config(base: str | None) -> dict:
    """The ``WardConfig`` fields of a new ward's base: a folder is imported, a public data spec (checked here) is trained."""
    if base is None:
        return {"base": None, "public": None}
    if is_folder(base):
        return {"base": "imported", "public": None}
    try:
        load_source(base)
    except DatawardError as error:
        raise DatawardError(f"the base {base!r} is neither a folder nor public data that loads ({error})") from None
    return {"base": "public", "public": base}


def check_fits(unet: UNet2DModel, config: WardConfig, source: str) -> None:
    """Refuse a base UNet that cannot denoise this ward's images, naming each mismatch with its numbers."""
    channels, size, _ = config.model_shape()
    wanted = {"sample_size": size, "in_channels": channels, "out_channels": channels, "num_class_embeds": config.num_classes}
    found = {key: unet.config.get(key) for key in wanted}
    if isinstance(found["sample_size"], (list, tuple)):
        found["sample_size"] = found["sample_size"][0] if len(set(found["sample_size"])) == 1 else found["sample_size"]
    wrong = [f"{key} is {found[key]}, this ward needs {value}" for key, value in wanted.items() if found[key] != value]
    if unet.config.get("class_embed_type") is not None:
        wrong.append(f"class_embed_type is {unet.config['class_embed_type']!r}, this ward needs the default (an embedding table)")
    if wrong:
        raise DatawardError(f"the base {source} does not fit this ward: " + "; ".join(wrong))


def load_unet_folder(folder: Path) -> UNet2DModel:
    """A ``UNet2DModel`` from a local ``save_pretrained`` folder, safetensors only (no pickle, no download)."""
    if not (folder / "config.json").is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise DatawardError(f"{folder} is not a diffusers UNet2DModel folder: it needs config.json and {WEIGHTS_FILE} "
                            f"(what UNet2DModel.save_pretrained writes with safetensors)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise DatawardError(f"{folder}/config.json is not valid JSON: {error}") from None
    if config.get("_class_name") not in (None, "UNet2DModel"):
        raise DatawardError(f"{folder} holds a {config['_class_name']}, not a UNet2DModel")
    try:
        return UNet2DModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        raise DatawardError(f"cannot load the base from {folder}: {error}") from None


def import_base(ward: Path, config: WardConfig, ledger: Ledger, folder: Path) -> int:
    """Copy a user's UNet2DModel folder into ``ward/models`` as the ward's base and record it (public, no IDs).
    Returns the ledger's model ID."""
    folder = Path(folder)
    unet = load_unet_folder(folder)
    check_fits(unet, config, str(folder))
    name = folder_prefix("public-denoiser", None) + f"0-{uuid.uuid4().hex[:8]}"
    tmp = ward / MODELS_DIR / f".tmp-{name}"
    unet.save_pretrained(str(tmp), safe_serialization=True)
    metadata = {"kind": "public-denoiser", "compartment": None, "stage": 0, "imported_from": str(folder.resolve()),
                "weights_sha256": weights_hash(tmp / WEIGHTS_FILE), "config": json.loads(unet.to_json_string()),
                "parameters": sum(p.numel() for p in unet.parameters()), "variant": "", "files_sha256": files_hashes(tmp)}
    (tmp / META_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    os.replace(tmp, ward / MODELS_DIR / name)
    return ledger.register_model("public-denoiser", None, 0, f"{MODELS_DIR}/{name}", [], "", metadata, public=True)


def base_summary(config: WardConfig) -> str:
    """One line on where the ward's compartments start and what they train."""
    delta = "every weight" if config.lora_rank() is None else f"a rank-{config.lora_rank()} LoRA adapter"
    if config.base == "public":
        return f"base: a public denoiser trained on {config.public}, each compartment fine-tunes {delta}"
    if config.base == "imported":
        return f"base: an imported UNet2DModel, each compartment fine-tunes {delta}"
    return "no base: each compartment trains from random weights"
