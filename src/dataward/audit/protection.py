"""The audit's ``protection`` section: what protects each compartment's data, and whether its guard steers."""

from __future__ import annotations

from typing import Any

from dataward.audit.sections import Audit, Measured
from dataward.reports import describe_protection

GUARD_PROBE = 16  # images sampled from each compartment alone, guarded, to measure how often its guard steers


def protection(audit: Audit) -> Measured:
    """Per compartment: DP with its recorded (ε, δ), a guard with the share of its checks that steered when sampling that
    compartment alone (``GUARD_PROBE`` images, the audit's seed and steps), or neither. A guard that never steers
    protects nothing: the report says so."""
    records = (audit.ward.privacy() or {}).get("compartments", {})
    rows: list[dict[str, Any]] = []
    for c in audit.compartments:
        record = records.get(str(c))
        dp = {"epsilon": record["epsilon"], "delta": record["delta"]} if isinstance(record, dict) else None
        steered = None
        if audit.guard:
            audit.say(f"protection: guarded samples of compartment {c}")
            steered = audit.ward.sample(GUARD_PROBE, seed=audit.seed, steps=audit.steps, allowed=[c], guard=True).guard_guided
        rows.append({"compartment": c, "dp": dp, "guard": audit.guard, "guard_steered_share": steered,
                     "protection": describe_protection(dp, audit.guard, steered)})
    return Measured({"compartments": rows, "guard_probe": GUARD_PROBE if audit.guard else None})
