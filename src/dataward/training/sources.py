"""The examples a ward's models learn from: its live samples (from the ledger) and its public data sets."""

from __future__ import annotations

import numpy as np
import torch

from dataward.benchmark_data import PACKAGES
from dataward.config import WardConfig
from dataward.data import Dataset, load_source
from dataward.errors import DatawardError
from dataward.store.ledger import Ledger


class WardData:
    """A ward's data as Datasets at the ward's image size; public sources are loaded once."""

    def __init__(self, config: WardConfig, ledger: Ledger):
        self.config = config
        self.ledger = ledger
        self.public_sources: dict[str, Dataset] = {}  # spec -> data, sorted by ID

    def dataset(self, rows: list[tuple]) -> Dataset:
        """Ledger sample rows (id, label, compartment, slice, image bytes, ...) as a Dataset."""
        c, s = self.config.channels, self.config.image_size
        images = torch.from_numpy(np.stack([np.frombuffer(r[4], dtype=np.float32).reshape(c, s, s) for r in rows]).copy())
        labels = torch.tensor([r[1] for r in rows], dtype=torch.long) if self.config.num_classes is not None else None
        return Dataset(tuple(r[0] for r in rows), images, labels, num_classes=self.config.num_classes)

    def training_data(self, compartment: int | None = None, max_slice: int | None = None) -> Dataset:
        """The live (not forgotten) training samples of one compartment or all, of slices up to ``max_slice``."""
        rows = self.ledger.samples(compartment, max_slice=max_slice)
        if not rows:
            raise DatawardError(f"compartment {compartment} holds no samples" if compartment is not None else "the ward holds no samples")
        return self.dataset(rows)

    def stage_ids(self, compartment: int | None) -> tuple[tuple[str, ...], ...]:
        """Per SISA stage r: the sorted live IDs of slices 0..r (of one compartment, or of all with None)."""
        rows = self.ledger.samples(compartment)
        return tuple(tuple(r[0] for r in rows if r[3] <= stage) for stage in range(self.config.slices))

    def heldout_data(self) -> Dataset | None:
        """The held-out reference set: digits' fixed held-out split for digits wards, the fixed test split (of the same
        classes) for mnist / fashion-mnist wards of the training split, else None."""
        if self.config.data.startswith("digits"):
            return load_source("digits:heldout").resized(self.config.image_size, self.config.channels)
        name, _, options = self.config.data.partition(":")
        if name in PACKAGES and "split=test" not in options.split(","):
            classes = [part for part in options.split(",") if part.startswith("classes=")]
            return load_source(",".join([f"{name}:split=test", *classes])).resized(self.config.image_size, self.config.channels)
        return None

    def public_source(self, spec: str) -> Dataset:
        """A public data source at the ward's image size, sorted by ID (loaded once)."""
        if spec not in self.public_sources:
            data = load_source(spec).resized(self.config.image_size, self.config.channels)
            self.public_sources[spec] = data.select(sorted(data.ids))
        return self.public_sources[spec]

    def public_data(self) -> Dataset:
        """The public denoiser's data: labelled exactly when the ward is class-conditional."""
        public = self.public_source(self.config.public)
        if (public.labels is None) != (self.config.num_classes is None) or (public.num_classes or 0) > (self.config.num_classes or 0):
            raise DatawardError(f"public data {self.config.public} has {public.num_classes} classes; the ward has {self.config.num_classes}")
        return public

    def autoencoder_data(self) -> Dataset:
        """The public autoencoder's data (labels unused)."""
        return self.public_source(self.config.autoencoder_data)
