"""The audit's ``protection`` section: what protects each compartment's data, whether it memorises, whether its guard steers.

Per compartment, ``PROBE`` images are sampled from that compartment alone, unguarded (and guarded, with guards), with
the audit's seed and steps. Their replication rate against the compartment's own training images (nearest /
second-nearest L2 < 1/3, :func:`dataward.audit.metrics.replication`) says whether the compartment memorises: at
``MEMORISES`` or more, replication is a risk and a guard (or DP) is what stops it. The rows are also recorded in the
ledger (a ``protection`` event), so ``dataward status`` can show them until a model is trained again.
"""

from __future__ import annotations

from typing import Any

from dataward.audit.metrics import replication
from dataward.audit.sections import Audit, Measured, to_signed
from dataward.errors import DatawardError
from dataward.pictures import guard_caption, guard_rows
from dataward.plots import Row
from dataward.ward_status import MEMORISES, PROTECTION_EVENT, describe_protection

PROBE = 32  # images sampled from each compartment alone (unguarded, and guarded with guards)
SHOWN = 12  # of which the report's "what a guard changed" picture shows the first


def protection(audit: Audit) -> Measured:
    """Per compartment: DP with its recorded (ε, δ), the unguarded replication rate of ``PROBE`` samples of that
    compartment alone (and whether that means it memorises), and with guards the guarded rate and the share of the
    guard's checks that steered. A guard that never steers protects nothing: the report says so. With guards, the
    artifact ``guard_pictures`` holds per compartment the rows and caption of "what a guard changed"."""
    records = (audit.ward.privacy() or {}).get("compartments", {})
    rows: list[dict[str, Any]] = []
    pictures: dict[int, tuple[list[Row], str]] = {}
    for c in audit.compartments:
        record = records.get(str(c))
        dp = {"epsilon": record["epsilon"], "delta": record["delta"]} if isinstance(record, dict) else None
        row: dict[str, Any] = {"compartment": c, "dp": dp, "guard": audit.guard}
        try:
            row |= _probe(audit, c, pictures)
        except DatawardError as error:  # a compartment with no servable model: say so, measure the others
            row |= {"unguarded_replication": None, "memorises": None, "guarded_replication": None, "guard_steered_share": None,
                    "probe_error": str(error)}
        row["protection"] = describe_protection(dp, audit.guard, row["guard_steered_share"], row["unguarded_replication"])
        rows.append(row)
    audit.ward.ledger.record_event(PROTECTION_EVENT, latest_model=audit.ward.ledger.latest_model_id(), probe=PROBE, seed=audit.seed,
                                   steps=audit.steps, compartments={str(r["compartment"]): _recorded(r) for r in rows})
    return Measured({"compartments": rows, "probe": PROBE, "memorises_at": MEMORISES}, {"guard_pictures": pictures})


def _probe(audit: Audit, compartment: int, pictures: dict[int, tuple[list[Row], str]]) -> dict[str, Any]:
    """Replication of unguarded (and guarded) samples of one compartment against its own training images; with guards,
    the picture of what the guard changed goes into ``pictures``."""
    audit.say(f"protection: samples of compartment {compartment} alone")
    data = audit.ward.training_data(compartment)
    train = data.images
    plain = audit.ward.sample(PROBE, seed=audit.seed, steps=audit.steps, allowed=[compartment])
    unguarded = replication(to_signed(plain.images), train, top_k=0).replication_rate
    out = {"unguarded_replication": unguarded, "memorises": unguarded >= MEMORISES, "guarded_replication": None, "guard_steered_share": None}
    if audit.guard:
        guarded = audit.ward.sample(PROBE, seed=audit.seed, steps=audit.steps, allowed=[compartment], guard=True)
        out |= {"guarded_replication": replication(to_signed(guarded.images), train, top_k=0).replication_rate,
                "guard_steered_share": guarded.guard_guided}
        pictures[compartment] = (guard_rows(plain.images[:SHOWN], guarded.images[:SHOWN], data), guard_caption(plain, guarded, audit.seed))
    return out


def _recorded(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in ("unguarded_replication", "memorises", "guarded_replication", "guard_steered_share")}

