"""A ward's status (:class:`WardStatus`, ``dataward status``): what each compartment serves, its privacy guarantee and
what protects it; and the index of its live sample IDs (``dataward samples``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dataward.config import WardConfig
from dataward.errors import DatawardError
from dataward.sampling.export import export_states
from dataward.store.checkpoints import disk_use
from dataward.store.ledger import Ledger
from dataward.training.planner import Planner
from dataward.training.privacy import ward_delta, ward_epsilon

PRIVACY_FIELDS = ("epsilon", "delta", "sigma", "clip", "sample_rate", "steps", "history", "trainable", "trainable_fraction", "accountant",
                  "epsilon_check", "noise_multiplicity")


def serving_state(planner: Planner) -> dict[str, str]:
    """Per compartment: what sampling uses right now (complete, a fallback stage, or left out)."""
    served = planner.served()
    out = {}
    for c in planner.ledger.compartments():
        if c not in served:
            out[str(c)] = "left out (no model that never saw a forgotten ID; retraining)" if planner.ledger.pending_forgets() else "untrained"
        elif planner.is_fallback(served[c]):
            out[str(c)] = f"fallback: stage {served[c].stage} checkpoint (stages 0..{planner.stage_count(served[c]) - 1})"
        else:
            out[str(c)] = "complete"
    return out


def sample_index(ledger: Ledger, compartment: int | None = None, search: str | None = None) -> list[dict]:
    """The live sample IDs (a forgotten ID is never listed), sorted, each with its compartment, slice and label;
    ``compartment``: one compartment's only; ``search``: IDs containing this text (case-insensitive)."""
    if compartment is not None and compartment not in ledger.compartments():
        raise DatawardError(f"unknown compartment {compartment}: this ward has {ledger.compartments()}")
    needle = None if search is None else search.lower()
    return [{"id": sample_id, "compartment": c, "slice": r, "label": label}
            for sample_id, label, c, r in ledger.samples(compartment, images=False) if needle is None or needle in sample_id.lower()]


def privacy(planner: Planner) -> dict | None:
    """(ε, δ) per DP compartment and for the ward (parallel composition: the max over disjoint compartments)."""
    config = planner.config
    if config.dp is None:
        return None
    served = planner.served()
    records, per = [], {}
    for c in planner.ledger.compartments():
        record = served.get(c)
        recorded = record.metadata.get("privacy") if record else None
        records.append(recorded)
        per[str(c)] = "not DP" if recorded is None else {k: recorded.get(k) for k in PRIVACY_FIELDS} | {"lr": recorded.get("extra", {}).get("lr")}
    eps = ward_epsilon(records)
    notes = []
    if any(r is None for r in records):
        notes.append("some compartments are not DP-trained: the ward as a whole has no finite ε; sample with --allow over DP compartments")
    if planner.served("router"):
        notes.append("the router saw every compartment without DP: sample with --weights density for the DP guarantee")
    if config.guard:
        notes.append("guards are trained on private data without DP: sampling with --guard is not covered by ε")
    return {"ward_epsilon": eps if math.isfinite(eps) else "inf", "ward_delta": ward_delta(records), "compartments": per, "notes": notes}


@dataclass(frozen=True)
class WardStatus:
    """Everything a user wants to know about a ward (:meth:`dataward.ward.Ward.status`); ``dataclasses.asdict`` of it is
    the JSON that ``dataward status --json`` prints. The nested parts are JSON-ready dicts."""

    path: str  # the ward folder
    ledger: str  # where the ledger lives: the SQLite file, or the PostgreSQL URL (no password)
    config: WardConfig  # the ward's config (ward.json)
    compartments: list[dict]  # per compartment: id, source, samples, forgotten, serving, model, guard, audited, protection
    router: dict | None  # the served router (id, stage, saw_compartments), None without one
    samples: int  # live samples over all compartments
    forgotten: int  # forgotten samples over all compartments
    pending_forgets: list[str]  # forget requests in effect whose retraining is not finished
    unerased_forgets: list[str]  # forget requests in effect whose physical erasure a reader of an older snapshot delays
    public_model: dict | None  # the served public denoiser (id, data, public), None without one
    base: dict | None  # what every compartment starts from (kind, adapter, model, data, imported_from), None without one
    latent: dict | None  # a latent ward's latent shape and served autoencoder, None in pixel space
    privacy: dict | None  # :func:`privacy`: (ε, δ) per DP compartment and for the ward, None without DP
    exports: list[dict]  # exported pipelines and whether each is stale
    events: list[dict]  # the ledger's latest 10 events
    disk_bytes: dict  # the ward's size on disk: total, training states, in-stage checkpoints


def status(planner: Planner) -> WardStatus:
    """Everything a user wants to know about the ward."""
    ledger, config = planner.ledger, planner.config
    counts = ledger.counts()
    router = planner.served("router").get(None)
    public = planner.served("public-denoiser").get(None)
    return WardStatus(
        path=str(planner.path),
        ledger=ledger.db.where,
        config=config,
        compartments=_compartments(planner, counts),
        router=None if router is None else {"id": router.id, "stage": router.stage, "saw_compartments": "all"},
        samples=sum(c["samples"] for c in counts.values()),
        forgotten=sum(c["forgotten"] for c in counts.values()),
        pending_forgets=[r for r, _ in ledger.pending_forgets()],
        unerased_forgets=ledger.unerased_forgets(),
        public_model=None if public is None else {"id": public.id, "data": config.public, "public": True},
        base=None if config.base is None else {"kind": config.base, "adapter": config.adapter, "model": None if public is None else public.id,
                                               "data": config.public, "imported_from": None if public is None else public.metadata.get("imported_from")},
        latent=_latent(planner),
        privacy=privacy(planner),
        exports=export_states(ledger),
        events=ledger.events(10),
        disk_bytes=disk_use(planner.path),
    )


def _compartments(planner: Planner, counts: dict) -> list[dict]:
    sources = planner.ledger.compartment_sources()
    served, serving, guards = planner.served(), serving_state(planner), planner.served("guard")
    audited = (audited_protection(planner) or {}).get("compartments", {})
    out = []
    for c in planner.ledger.compartments():
        entry = {"id": c, "source": sources[c], "samples": counts[c]["samples"], "forgotten": counts[c]["forgotten"], "serving": serving[str(c)]}
        if c in served:
            folder = planner.path / served[c].path
            entry["model"] = {"id": served[c].id, "stage": served[c].stage, "path": served[c].path, "steps": served[c].metadata.get("steps"),
                              "ids_hash": served[c].ids_hash, "bytes": sum(f.stat().st_size for f in folder.iterdir()) if folder.is_dir() else None}
        if planner.config.guard:
            entry["guard"] = None if c not in guards else {"id": guards[c].id, "stage": guards[c].stage} | {
                key: guards[c].metadata.get(key) for key in GUARD_FIGURES}
        measured = audited.get(str(c), {})
        entry["audited"] = measured or None  # the newest audit's replication and steering figures, while they are current
        sure = (guards[c].metadata.get("confident_members_by_t") or None) if c in guards else None
        entry["protection"] = describe_protection(served[c].metadata.get("privacy") if c in served else None, c in guards,
                                                  measured.get("guard_steered_share"), measured.get("unguarded_replication"),
                                                  None if sure is None else max(sure.values()))
        out.append(entry)
    return out


# what a guard's training records of it (dataward.training.kinds): accuracy on its bits, and how often it is confident
# enough to steer on its members and on public images it never saw (its false positives), by t at the ward's α
GUARD_FIGURES = ("accuracy_by_t", "alpha", "confident_members_by_t", "confident_public_by_t", "public_probe")


MEMORISES = 0.05  # unguarded replication at or above this: the compartment memorises (issue 17: "where unguarded >= 5%")
PROTECTION_EVENT = "protection"  # the ledger event in which the audit records its protection rows (status shows the newest)


def describe_protection(dp: dict | None, guarded: bool, steered: float | None = None, unguarded_replication: float | None = None,
                        sure_on_members: float | None = None) -> str:
    """One phrase for what protects a compartment's data: DP with its (ε, δ), a trained guard (with the share of its
    checks that steered, when measured), both, or neither; and, when measured, whether the compartment memorises (its
    unguarded replication rate). A guard that never steers protects nothing, and the phrase says so: one that steered
    on none of the audit's checks (``steered`` 0), or, unaudited, one never sure on its own members at any t
    (``sure_on_members``: the largest share, over t, of members it is sure enough on to steer). Used by ``status`` and
    the audit."""
    parts = []
    if dp:
        parts.append(f"DP (ε = {dp['epsilon']:.3f}, δ = {dp['delta']:.2e})")
    if guarded:
        if steered == 0 or (steered is None and sure_on_members == 0):
            seen = "steered on none of the audit's checks" if steered == 0 else "is never sure on its members at any t"
            parts.append(f"a guard that {seen}, so it protects nothing (train it longer: dataward guard WARD --steps N)")
        else:
            parts.append("guard (when sampled with --guard)" if steered is None else f"guard (steered {100 * steered:.1f}% of its checks)")
    text = " + ".join(parts) or "neither DP nor a guard: exact forgetting and access rights only"
    if unguarded_replication is None:
        return text
    share = f"{100 * unguarded_replication:.1f}% of its unguarded samples are copies"
    if unguarded_replication < MEMORISES:
        return f"{text}; does not memorise ({share})"
    return f"{text}; MEMORISES: {share}" + ("" if guarded or dp else " (train guards: dataward guard WARD)")


def audited_protection(planner: Planner) -> dict | None:
    """The newest audit's protection rows (``{compartment: row}``, see :mod:`dataward.audit.protection`), if no model
    was trained since; else None (the figures would describe models that are no longer served)."""
    events = [e["detail"] for e in planner.ledger.events_of(PROTECTION_EVENT)]
    if not events or events[-1].get("latest_model") != planner.ledger.latest_model_id():
        return None
    return events[-1]


def _latent(planner: Planner) -> dict | None:
    config = planner.config
    if not config.latent:
        return None
    autoencoder = planner.served("autoencoder").get(None)
    return {"latent_shape": list(config.model_shape()), "autoencoder": None if autoencoder is None else {
        "id": autoencoder.id, "data": config.autoencoder_data, "public": True,
        **{k: autoencoder.metadata.get(k) for k in ("scaling_factor", "public_reconstruction_mse")}}}
