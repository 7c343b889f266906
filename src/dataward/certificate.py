"""The forgetting certificate: retrain a ward's served models from scratch on the live IDs and compare weight hashes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from dataward import numerics
from dataward.store.checkpoints import checkpoint_hash
from dataward.store.ledger import Ledger
from dataward.training.planner import Planner
from dataward.training.runner import JobRunner


def _check(planner: Planner, runner: JobRunner, lineage, forgotten: set[str], scratch: Path, device: str, progress) -> dict:
    """One lineage's served model against the same lineage retrained from scratch into ``scratch``."""
    served = planner.served(lineage.kind).get(lineage.compartment)
    if served is None:
        return {"kind": lineage.kind, "compartment": lineage.compartment, "equal": False, "reason": "no served model"}
    results = runner.run(planner.plan(lineage, from_scratch=True), device, progress, out_root=scratch)
    scratch_hash = checkpoint_hash(scratch / results[served.stage]["folder"])
    served_hash = checkpoint_hash(planner.path / served.path)
    check = {
        "kind": lineage.kind, "compartment": lineage.compartment, "stage": served.stage, "model": served.id,
        "served_sha256": served_hash, "scratch_sha256": scratch_hash,
        "equal": served_hash == scratch_hash, "saw_forgotten_ids": len(planner.ledger.model_sample_ids(served.id) & forgotten),
    }
    if not check["equal"]:  # say whether this machine computes other bytes than the one that trained the model
        machine = numerics.differences(served.metadata.get("numerics"), numerics.fingerprint())
        check["reason"] = ("this machine's numerics differ from the training machine's: " + "; ".join(machine)) if machine else \
            "same numerics as the training machine: the served model is not what its lineage trains"
    return check


def forgetting_certificate(planner: Planner, runner: JobRunner, device: str = "cpu", progress=None, compartments: list[int] | None = None) -> dict:
    """Every served model (or, with ``compartments``, those compartments' models and every joint model) retrained from
    scratch and compared by weight hash; ``ok`` when all are equal and none saw a forgotten ID. Recorded in the ledger as
    a ``certificate`` event (the audit reports it while no model changed since)."""
    forgotten = set(planner.ledger.forgotten_ids())
    with tempfile.TemporaryDirectory(prefix="dataward-verify-") as scratch:
        checks = [_check(planner, runner, lineage, forgotten, Path(scratch), device, progress) for lineage in planner.lineages()
                  if compartments is None or lineage.compartment is None or lineage.compartment in compartments]
    ok = bool(checks) and all(c["equal"] and not c.get("saw_forgotten_ids") for c in checks)
    planner.ledger.record_event("certificate", ok=ok, forgotten=len(forgotten), models=sorted(c["model"] for c in checks if "model" in c),
                                complete=compartments is None, latest_model=planner.ledger.latest_model_id())
    return {"ok": ok, "forgotten": len(forgotten), "models": checks}


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
