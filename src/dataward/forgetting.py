"""What a forget request names and what it did: the one check of the IDs a forget names, and :class:`ForgetResult`.

A forget runs in two named steps of :class:`dataward.ward.Ward`: ``accept_forget`` (one ledger transaction: in effect at
once, from any process, never waiting on the writer lock nor on erasure) and ``finish_forget`` (retrain what is missing,
under the writer lock). The CLI, the service and the demo call the same two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dataward.errors import DatawardError, echo
from dataward.store.ledger import Ledger

__all__ = ["ForgetResult", "UnknownSampleIds", "split_forget_ids"]


class UnknownSampleIds(DatawardError):
    """A forget named IDs the ward does not hold; nothing was forgotten (the service's 404)."""


@dataclass(frozen=True)
class ForgetResult:
    """What one forget request did; ``dataclasses.asdict`` of it is the JSON that ``dataward forget --json`` prints and
    ``POST /v1/forget`` answers."""

    ids: tuple[str, ...]  # the IDs this request forgot (sorted)
    already_forgotten: tuple[str, ...]  # IDs it named that an earlier request had forgotten
    request: str | None  # the request's ID in the ledger; None when there was nothing new to forget
    state: str  # noop | accepted (in effect, retraining pending) | done (retrained)
    message: str | None = None  # why nothing happened (noop)
    quarantined_models: int = 0  # models that saw the IDs: quarantined (never served again) and their files deleted
    serving_during_retraining: dict[str, str] = field(default_factory=dict)  # per compartment: what sampling uses meanwhile
    erased: bool | None = None  # no copy of the images is left in the ledger's files: false while a reader of an older snapshot delays it (None: noop)
    stale_exports: tuple[str, ...] = ()  # export folders (copies outside the ward) that held the IDs
    retrain_seconds: float | None = None  # finish_forget: how long this process retrained
    retraining_elsewhere: str | None = None  # finish_forget: another process holds the writer lock and retrains this too


def split_forget_ids(ledger: Ledger, ids: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The IDs a forget names, sorted and deduplicated, as (new, already forgotten). Raises :class:`UnknownSampleIds`
    naming the unknown ones (nothing is forgotten then)."""
    ids = sorted(set(ids))
    if not ids:
        raise DatawardError("no sample IDs given to forget")
    rows = ledger.sample_rows(ids)
    unknown = [i for i in ids if i not in rows]
    if unknown:
        shown = ", ".join(echo(i if i.isprintable() and i.strip() == i else repr(i)) for i in unknown[:10])
        raise UnknownSampleIds(f"unknown sample ID(s), nothing was forgotten: {shown}{' ...' if len(unknown) > 10 else ''}")
    return tuple(i for i in ids if rows[i][2] is None), tuple(i for i in ids if rows[i][2] is not None)
