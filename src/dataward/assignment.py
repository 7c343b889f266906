"""Which compartment and which SISA slice each new sample goes to, and storing it in the ledger.

Assignment is a pure function of the ward's seed and the sample IDs (or labels, or sources), so the same data always
lands in the same compartments and slices, whatever else the ward holds.
"""

from __future__ import annotations

import hashlib

from dataward.config import Adapter, AssignBy, WardConfig
from dataward.data import Dataset
from dataward.errors import DatawardError
from dataward.numerics import Numerics
from dataward.store.ledger import Ledger

MAX_ID_LENGTH = 512  # characters of a sample ID (the service's forget body limit is sized for 10,000 of them)


def check_layout(compartments: int, slices: int, by: AssignBy, numerics: Numerics, adapter: str = "full") -> None:
    """Refuse a new ward's layout unless it has at least one compartment and slice, a known assignment, numerics and adapter."""
    if compartments < 1 or slices < 1:
        raise DatawardError(f"compartments and slices must be >= 1, got {compartments} and {slices}")
    if by not in ("random", "label", "source"):
        raise DatawardError(f"--by must be random, label or source, got {by!r}")
    if numerics not in ("portable", "native"):
        raise DatawardError(f"numerics must be portable or native, got {numerics!r}")
    Adapter.parse(adapter)


def check_new_data(config: WardConfig, dataset: Dataset) -> None:
    """Refuse data for a new compartment unless it is labelled exactly when the ward is class-conditional, within its classes."""
    if (dataset.labels is None) != (config.num_classes is None):
        raise DatawardError("the new data must be labelled exactly when the ward is class-conditional")
    if dataset.labels is not None and int(dataset.labels.max()) >= config.num_classes:
        raise DatawardError(f"the new data has label {int(dataset.labels.max())} but the ward has {config.num_classes} classes")


def stable_bucket(seed: int, salt: str, sample_id: str, buckets: int) -> int:
    """A bucket in 0..buckets-1 from a hash of (seed, salt, sample ID)."""
    digest = hashlib.sha256(f"{seed}/{salt}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % buckets


def _compartments(config: WardConfig, dataset: Dataset, source: str, first: int, adding: bool, new: int) -> tuple[list[int], dict[int, str]]:
    """Per sample its compartment, and per new compartment a description of its source."""
    if config.by == "source":
        owners = dataset.owners or tuple(source for _ in dataset.ids)
        names = sorted(set(owners))
        index = {name: first + i for i, name in enumerate(names)}
        return [index[o] for o in owners], {index[name]: name for name in names}
    if config.by == "label" and not adding:
        if dataset.labels is None:
            raise DatawardError("--by label needs labelled data")
        return [first + int(l) % new for l in dataset.labels.tolist()], {first + i: f"{source} labels = {i} mod {new}" for i in range(new)}
    if adding:  # add: a new data source is a new compartment
        return [first] * len(dataset), {first: source}
    return ([first + stable_bucket(config.seed, "compartment", i, new) for i in dataset.ids],
            {first + i: f"{source} (random {i}/{new})" for i in range(new)})


def check_sample_ids(ids: tuple[str, ...] | list[str]) -> None:
    """The one rule for sample IDs (what ``forget`` can name on the command line and over HTTP): 1 to
    ``MAX_ID_LENGTH`` characters, no control characters. Refused with the first offending IDs named."""
    bad = [i for i in ids if not (1 <= len(i) <= MAX_ID_LENGTH) or any(ord(ch) < 32 or ord(ch) == 127 for ch in i)]
    if bad:
        shown = ", ".join(repr(i[:40] + ("..." if len(i) > 40 else "")) for i in bad[:3])
        raise DatawardError(f"{len(bad)} sample ID(s) break the ID rule (1-{MAX_ID_LENGTH} characters, no control characters), "
                            f"e.g. {shown}: rename them in the data (npz ids column, file names)")


def insert_samples(ledger: Ledger, config: WardConfig, dataset: Dataset, source: str, new_compartments: int) -> list[int]:
    """Assign samples to compartments and slices and store them (IDs checked); returns the new compartment IDs."""
    check_sample_ids(dataset.ids)
    existing = ledger.compartments()
    first = (max(existing) + 1) if existing else 0
    assign, sources = _compartments(config, dataset, source, first, bool(existing), new_compartments)
    labels = dataset.labels.tolist() if dataset.labels is not None else [None] * len(dataset)
    owners = dataset.owners or (None,) * len(dataset)
    images = dataset.images.numpy()
    rows = [
        (sid, labels[k], assign[k], stable_bucket(config.seed, "slice", sid, config.slices), source, owners[k], images[k])
        for k, sid in enumerate(dataset.ids)
    ]
    ledger.add_samples(rows, sources, "samples-added", source=source)
    return sorted(sources)
