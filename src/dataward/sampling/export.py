"""Exports: one ordinary diffusers model per customer. ``dataward export WARD --allow 0,2 --out DIR`` writes a
``DDPMPipeline`` folder (safetensors only, loadable with stock diffusers) holding the *soup* of the allowed compartments
(their data-share-weighted weight average, :meth:`dataward.sampling.served.ServedModels.soup`), with ``dataward-manifest.json``.

An export is a copy outside the ward's control (never inside the ward folder): a later forget cannot reach it. The
ledger records each export (an ``export`` event with its manifest, which records what each exported model saw: its
stage, the number and hash of its IDs, a fallback stage's too), and :func:`export_states` says which are *stale*: a
compartment's live IDs no longer hash to what its exported model saw (a forget or an add changed them, or the model was
an earlier stage while its compartment retrained). Delete or re-export a stale export.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import dataward
from dataward.data import ids_hash
from dataward.errors import DatawardError
from dataward.sampling.served import ServedModels
from dataward.store.checkpoints import weights_hash
from dataward.store.ledger import Ledger
from dataward.store.lock import staged

MANIFEST = "dataward-manifest.json"
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def fold_class(unet: UNet2DModel, label: int) -> UNet2DModel:
    """An unconditional copy of a class-conditional ``unet`` that always denoises as class ``label``: the class embedding
    (added to the time embedding) is folded into the time embedding's last bias, so stock pipelines can sample it."""
    config = dict(unet.config) | {"num_class_embeds": None, "class_embed_type": None}
    folded = UNet2DModel.from_config(config)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("class_embedding.")}
    with torch.no_grad():
        state["time_embedding.linear_2.bias"] = state["time_embedding.linear_2.bias"] + unet.class_embedding.weight[label]
    folded.load_state_dict(state)
    return folded


def _check(models: ServedModels, allowed: list[int], label: int | None) -> None:
    if models.config.base is None:
        raise DatawardError("an export is one model, the soup of the allowed compartments, and soup needs compartments fine-tuned "
                            "from one base; this ward has none (its compartments trained from random weights): serve it with "
                            "`dataward serve` or sample it with dataward.sampling.WardPipeline instead")
    if models.config.latent:
        raise DatawardError("a latent ward's models denoise autoencoder latents, which a DDPMPipeline cannot decode: export is "
                            "for pixel wards; use dataward.sampling.WardPipeline")
    unknown = [c for c in allowed if c not in models.compartments()]
    if unknown:
        raise DatawardError(f"unknown compartment(s) {unknown}: this ward has {models.compartments()}")
    missing = [c for c in allowed if c not in models.served()]
    if missing:
        raise DatawardError(f"compartment(s) {missing} have no served model now (not trained, or retraining after a forget): "
                            f"run `dataward train {models.path}` first")
    classes = models.config.num_classes
    if classes is not None and label is None:
        raise DatawardError(f"this ward's models are class-conditional and a stock DDPMPipeline cannot pass a class: export one "
                            f"class with --label 0..{classes - 1} (folded into the model), or sample with WardPipeline")
    if label is not None and (classes is None or not 0 <= label < classes):
        raise DatawardError(f"--label must be between 0 and {classes - 1}" if classes else "this ward is unconditional: drop --label")


def export_ward(models: ServedModels, out: str | Path, allowed: list[int] | None = None, label: int | None = None) -> dict:
    """Write the soup of ``allowed`` (all by default) as a stock ``DDPMPipeline`` folder ``out`` (new or empty) and record
    it in the ledger (with the ward's and the export's paths, which the manifest in ``out`` leaves out); returns the manifest."""
    out = Path(out)
    allowed = sorted(set(models.compartments() if allowed is None else allowed))
    _check(models, allowed, label)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatawardError(f"{out} already exists and is not an empty folder: choose a new export folder")
    if out.resolve().is_relative_to(models.path.resolve()):
        raise DatawardError(f"{out} is inside the ward folder, whose files the ward manages (and deletes): export outside it")
    served, counts = models.served(), models.ledger.counts()
    records = [served[c] for c in allowed]
    shares = [float(counts[c]["samples"]) for c in allowed]
    model = models.soup(records, shares) if len(records) > 1 else models.model(records[0])
    unet = fold_class(model, label) if label is not None else copy.deepcopy(model)
    unet.register_to_config(_name_or_path="dataward-export")  # not the server folder it was loaded from
    public = models.served("public-denoiser").get(None)
    privacy = {str(r.compartment): {k: r.metadata["privacy"].get(k) for k in ("epsilon", "delta")} for r in records if r.metadata.get("privacy")}
    manifest = {
        "dataward_version": dataward.__version__, "created_at": time.time(), "weights": "soup",
        "label": label, "base": {"kind": models.config.base, "weights_sha256": public.metadata.get("weights_sha256") if public else None},
        "compartments": [{"id": c, "model": r.id, "stage": r.stage, "fallback": models.is_fallback(r), "share": s / sum(shares),
                          "samples": r.metadata.get("num_ids", counts[c]["samples"]), "weights_sha256": r.metadata.get("weights_sha256"),
                          "ids_sha256": r.ids_hash}  # what the exported model saw, not what the compartment holds now
                         for c, r, s in zip(allowed, records, shares)],
        "privacy": privacy or None,
        "note": "a copy outside the ward: a later forget cannot reach it; `dataward status` says when it is stale",
    }
    with staged(out, keep_lock_file=False) as staging:  # nothing is left behind on error
        DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(models.scheduler.config)).save_pretrained(staging, safe_serialization=True)
        manifest["unet_sha256"] = weights_hash(staging / UNET_FILE)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if len(models.ledger.ready_models([r.id for r in records])) < len(records):  # a forget committed meanwhile
            raise DatawardError("the exported models stopped being served while exporting (a forget of an ID they saw, or a "
                                "retraining): nothing was exported; export again")
    # the customer's folder says nothing about the server's file system; the ledger, server-side, records where it went
    models.ledger.record_event("export", **manifest, ward=str(models.path.resolve()), folder=str(out.resolve()))
    return manifest


def live_ids_hash(ledger: Ledger, compartment: int) -> str:
    """The hash of a compartment's live sample IDs (read without their images)."""
    return ids_hash(row[0] for row in ledger.samples(compartment, images=False))


def export_states(ledger: Ledger) -> list[dict]:
    """Every export recorded in the ledger: folder, compartments, when, and whether it is stale (with the compartments
    whose live IDs are not the ones their exported model saw)."""
    out, hashes = [], {}
    for event in ledger.events_of("export"):
        manifest = event["detail"]
        for c in manifest["compartments"]:
            if c["id"] not in hashes:
                hashes[c["id"]] = live_ids_hash(ledger, c["id"])
        changed = [c["id"] for c in manifest["compartments"] if hashes[c["id"]] != c["ids_sha256"]]
        out.append({"folder": manifest["folder"], "compartments": [c["id"] for c in manifest["compartments"]], "label": manifest["label"],
                    "at": event["at"], "stale": bool(changed), "changed_compartments": changed})
    return out
