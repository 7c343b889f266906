"""The forgetting certificate: retrain a ward's served models from scratch on the live IDs and compare weight hashes.

Public models (the base, a latent ward's autoencoder) saw no private ID, so no forget can concern them: by default
they are not retrained but checked, their weights against the hash recorded when they were trained and their record
against the ward's spec (the public IDs, recipe and budget it names now). ``retrain_public`` retrains them too.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, replace
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


@dataclass(frozen=True, kw_only=True)
class ModelCheck:
    """One served model checked by the certificate: retrained from scratch (``method`` ``retrained``) or, a public
    model, its weights against the hash recorded when it was trained (``hash-checked``). Fields in the order of the JSON."""

    kind: str  # the model kind (denoiser, guard, router, public-denoiser, autoencoder)
    compartment: int | None  # its compartment; None for a ward-wide model (the router, the public base)
    stage: int | None = None  # the served stage (None: no served model)
    model: int | None = None  # the served model's ID in the ledger (None: no served model)
    method: str  # retrained | hash-checked
    served_sha256: str | None = None  # the served checkpoint's weight hash
    scratch_sha256: str | None = None  # retrained: the weight hash of the same stage retrained from scratch
    recorded_sha256: str | None = None  # hash-checked: the weight hash recorded when the model was trained
    equal: bool  # the served weights are the expected ones (and a public model's IDs are those the ward's spec names)
    saw_forgotten_ids: int | None = None  # forgotten IDs the served model's record says it trained on (must be 0)
    reason: str | None = None  # why it is not equal (None when it is)

    @property
    def passed(self) -> bool:
        """Equal and trained on no forgotten ID."""
        return self.equal and not self.saw_forgotten_ids

    def to_json(self) -> dict:
        """The check as JSON: its fields less those that do not apply to it (None), ``compartment`` always."""
        return {key: value for key, value in asdict(self).items() if value is not None or key == "compartment"}


@dataclass(frozen=True)
class Certificate:
    """What ``dataward verify`` found; :meth:`to_json` is what ``dataward verify --json`` prints (and the demo's summary)."""

    ok: bool  # every checked model passed (equal, no forgotten ID), and there was at least one
    forgotten: int  # how many IDs the ward had forgotten when it was checked
    public_models: str  # how public models were checked: hash-checked (the default) or retrained (``retrain_base``)
    models: tuple[ModelCheck, ...]  # one check per served model, in the planner's lineage order

    def to_json(self) -> dict:
        """The certificate as JSON: ``asdict`` with each check's :meth:`ModelCheck.to_json`."""
        return asdict(self) | {"models": [check.to_json() for check in self.models]}


def _check(planner: Planner, runner: JobRunner, lineage, forgotten: set[str], scratch: Path, device: str, progress) -> ModelCheck:
    """One lineage's served model against the same lineage retrained from scratch into ``scratch``."""
    served = planner.served(lineage.kind).get(lineage.compartment)
    if served is None:
        return ModelCheck(kind=lineage.kind, compartment=lineage.compartment, method=RETRAINED, equal=False, reason="no served model")
    results = runner.run(planner.plan(lineage, from_scratch=True), device, progress, out_root=scratch)
    scratch_hash = checkpoint_hash(scratch / results[served.stage]["folder"])
    served_hash = checkpoint_hash(planner.path / served.path)
    check = ModelCheck(kind=lineage.kind, compartment=lineage.compartment, method=RETRAINED, equal=served_hash == scratch_hash,
                       stage=served.stage, model=served.id, served_sha256=served_hash, scratch_sha256=scratch_hash,
                       saw_forgotten_ids=len(planner.ledger.model_sample_ids(served.id) & forgotten))
    if check.equal:
        return check
    machine = numerics.differences(served.metadata.get("numerics"), numerics.fingerprint())  # other bytes on this machine?
    return replace(check, reason=("this machine's numerics differ from the training machine's: " + "; ".join(machine)) if machine else
                   "same numerics as the training machine: the served model is not what its lineage trains")


def _check_public(planner: Planner, lineage: Lineage, forgotten: set[str]) -> ModelCheck:
    """A public model checked without retraining: its weights against the hash recorded when it was trained, and the IDs
    it saw against the public data the ward's spec names now (its recipe and budget: :meth:`Planner.served` serves only
    a current one)."""
    served = planner.served(lineage.kind).get(None)
    if served is None:
        return ModelCheck(kind=lineage.kind, compartment=None, method=HASH_CHECKED, equal=False, reason="no served model")
    found, recorded = checkpoint_hash(planner.path / served.path), served.metadata.get("weights_sha256")
    same_data = served.ids_hash == ids_hash(lineage.stage_ids[served.stage])
    reason = ("its weights are not the ones recorded when it was trained (the file was changed or replaced)" if found != recorded else
              "it was trained on other public IDs than the ward's spec names now" if not same_data else None)
    return ModelCheck(kind=lineage.kind, compartment=None, method=HASH_CHECKED, equal=found == recorded and same_data, stage=served.stage,
                      model=served.id, served_sha256=found, recorded_sha256=recorded,
                      saw_forgotten_ids=len(planner.ledger.model_sample_ids(served.id) & forgotten), reason=reason)


def forgetting_certificate(planner: Planner, runner: JobRunner, device: str = "cpu", progress: ProgressOption = None,
                           compartments: list[int] | None = None, retrain_public: bool = False) -> Certificate:
    """Every served model (or, with ``compartments``, those compartments' models and every joint model) retrained from
    scratch and compared by weight hash, public models hash-checked unless ``retrain_public``; ``ok`` when all are equal
    and none saw a forgotten ID. Recorded in the ledger as a ``certificate`` event (the audit reports it while no model
    changed since). ``progress``: see :mod:`dataward.progress`."""
    forgotten = set(planner.ledger.forgotten_ids())
    lineages = [lineage for lineage in planner.lineages() if compartments is None or lineage.compartment is None or lineage.compartment in compartments]
    with tempfile.TemporaryDirectory(prefix="dataward-verify-") as scratch, progress_display(progress) as shown:
        checks = [_check_public(planner, lineage, forgotten) if KINDS[lineage.kind].public and not retrain_public else
                  _check(planner, runner, lineage, forgotten, Path(scratch), device, shown) for lineage in lineages]
    ok = bool(checks) and all(c.passed for c in checks)
    public = RETRAINED if retrain_public else HASH_CHECKED
    planner.ledger.record_event("certificate", ok=ok, forgotten=len(forgotten), models=sorted(c.model for c in checks if c.model is not None),
                                complete=compartments is None, latest_model=planner.ledger.latest_model_id(), public_models=public)
    return Certificate(ok, len(forgotten), public, tuple(checks))


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
