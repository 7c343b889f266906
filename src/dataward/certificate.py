"""The forgetting certificate: retrain a ward's served models from scratch on the live IDs and compare weight hashes.

Public models (the base, a latent ward's autoencoder) saw no private ID, so no forget can concern them: by default
they are not retrained but checked, their weights against the hash recorded when they were trained and their record
against the ward's spec (the public IDs, recipe and budget it names now). ``retrain_public`` retrains them too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from dataward import numerics
from dataward.data import ids_hash
from dataward.progress import ProgressOption, progress_display
from dataward.training.kinds import KINDS
from dataward.store.checkpoints import checkpoint_hash
from dataward.store.ledger import Ledger
from dataward.training.planner import Lineage, Planner
from dataward.training.runner import JobRunner

RETRAINED = "retrained"  # a check's method: the served model against its lineage retrained from scratch
HASH_CHECKED = "hash-checked"  # a public model's: its weights against the recorded hash, its record against the ward's spec


def _check(planner: Planner, runner: JobRunner, lineage, forgotten: set[str], scratch: Path, device: str, progress) -> dict:
    """One lineage's served model against the same lineage retrained from scratch into ``scratch``."""
    served = planner.served(lineage.kind).get(lineage.compartment)
    if served is None:
        return {"kind": lineage.kind, "compartment": lineage.compartment, "equal": False, "reason": "no served model", "method": RETRAINED}
    results = runner.run(planner.plan(lineage, from_scratch=True), device, progress, out_root=scratch)
    scratch_hash = checkpoint_hash(scratch / results[served.stage]["folder"])
    served_hash = checkpoint_hash(planner.path / served.path)
    check = {
        "kind": lineage.kind, "compartment": lineage.compartment, "stage": served.stage, "model": served.id, "method": RETRAINED,
        "served_sha256": served_hash, "scratch_sha256": scratch_hash,
        "equal": served_hash == scratch_hash, "saw_forgotten_ids": len(planner.ledger.model_sample_ids(served.id) & forgotten),
    }
    if not check["equal"]:  # say whether this machine computes other bytes than the one that trained the model
        machine = numerics.differences(served.metadata.get("numerics"), numerics.fingerprint())
        check["reason"] = ("this machine's numerics differ from the training machine's: " + "; ".join(machine)) if machine else \
            "same numerics as the training machine: the served model is not what its lineage trains"
    return check


def _check_public(planner: Planner, lineage: Lineage, forgotten: set[str]) -> dict:
    """A public model checked without retraining: its weights against the hash recorded when it was trained, and the IDs
    it saw against the public data the ward's spec names now (its recipe and budget: :meth:`Planner.served` serves only
    a current one)."""
    served = planner.served(lineage.kind).get(None)
    if served is None:
        return {"kind": lineage.kind, "compartment": None, "equal": False, "reason": "no served model", "method": HASH_CHECKED}
    found, recorded = checkpoint_hash(planner.path / served.path), served.metadata.get("weights_sha256")
    same_data = served.ids_hash == ids_hash(lineage.stage_ids[served.stage])
    check = {"kind": lineage.kind, "compartment": None, "stage": served.stage, "model": served.id, "method": HASH_CHECKED,
             "served_sha256": found, "recorded_sha256": recorded, "equal": found == recorded and same_data,
             "saw_forgotten_ids": len(planner.ledger.model_sample_ids(served.id) & forgotten)}
    if found != recorded:
        check["reason"] = "its weights are not the ones recorded when it was trained (the file was changed or replaced)"
    elif not same_data:
        check["reason"] = "it was trained on other public IDs than the ward's spec names now"
    return check


def forgetting_certificate(planner: Planner, runner: JobRunner, device: str = "cpu", progress: ProgressOption = None,
                           compartments: list[int] | None = None, retrain_public: bool = False) -> dict:
    """Every served model (or, with ``compartments``, those compartments' models and every joint model) retrained from
    scratch and compared by weight hash, public models hash-checked unless ``retrain_public``; ``ok`` when all are equal
    and none saw a forgotten ID. Recorded in the ledger as a ``certificate`` event (the audit reports it while no model
    changed since). ``progress``: see :mod:`dataward.progress`."""
    forgotten = set(planner.ledger.forgotten_ids())
    lineages = [lineage for lineage in planner.lineages() if compartments is None or lineage.compartment is None or lineage.compartment in compartments]
    with tempfile.TemporaryDirectory(prefix="dataward-verify-") as scratch, progress_display(progress) as shown:
        checks = [_check_public(planner, lineage, forgotten) if KINDS[lineage.kind].public and not retrain_public else
                  _check(planner, runner, lineage, forgotten, Path(scratch), device, shown) for lineage in lineages]
    ok = bool(checks) and all(c["equal"] and not c.get("saw_forgotten_ids") for c in checks)
    public = RETRAINED if retrain_public else HASH_CHECKED
    planner.ledger.record_event("certificate", ok=ok, forgotten=len(forgotten), models=sorted(c["model"] for c in checks if "model" in c),
                                complete=compartments is None, latest_model=planner.ledger.latest_model_id(), public_models=public)
    return {"ok": ok, "forgotten": len(forgotten), "public_models": public, "models": checks}


def no_certificate_reason(ledger: Ledger) -> str:
    """Why no certificate covers the models served now, and what the latest ``dataward verify`` checked (one of some
    compartments only, or one followed by new models, speaks of other models than the ones served now)."""
    reason = "not run by this audit (--verify retrains every model and compares weight hashes)"
    events = [e["detail"] for e in ledger.events_of("certificate")]
    if not events:
        return reason
    latest = events[-1]
    scope = "every model served then" if latest.get("complete") else f"{len(latest['models'])} model(s) of some compartments only"
    changed = latest["latest_model"] != ledger.latest_model_id() or latest["forgotten"] != len(ledger.forgotten_ids())
    return (f"{reason}; the latest dataward verify checked {scope}: {'OK' if latest['ok'] else 'FAILED'}"
            + (", and models were trained or IDs forgotten after it" if changed else ""))
