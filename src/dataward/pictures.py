"""Pictures that show what a ward's protections do, for the demo, ``dataward forget --show`` and the audit report:
a forgotten training image beside its nearest samples before and after the forget, and what a guard changed (the same
seeds sampled unguarded and guarded, their difference, and the nearest training image of each unguarded sample).
Distances are pixel L2 on images in [0, 1]: the square root of the sum over every pixel and channel."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from dataward.data import Dataset
from dataward.sampling.plan import SampleResult
from dataward.plots import Layout, Row, draw_rows

NEAREST = 4  # nearest samples shown per forgotten image, before and after the forget
PER_ID = 16  # samples of its class drawn per forgotten image, before and after
SHOWN = 5  # forgotten images shown at most
DIFFERENCE_GAIN = 4  # the guard picture's difference row is |guarded - unguarded| times this


class PicturedWard(Protocol):
    """What the pictures need from a ward (:class:`dataward.ward.Ward` is one)."""

    def sample(self, n: int, **options) -> SampleResult: ...
    def training_data(self, compartment: int | None = None) -> Dataset: ...


def pixel_distances(query: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Pixel L2 distance of one image (C, H, W) to each of ``pool`` (N, C, H, W), both in [0, 1]: (N,)."""
    return (pool.float() - query.float()).flatten(1).norm(dim=1)


def nearest_training(images: torch.Tensor, train: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image (N, C, H, W) in [0, 1], its nearest training image (in [0, 1]) and the pixel L2 distance to it."""
    pool = (train.images.float() + 1) / 2
    distances = torch.cdist(images.float().flatten(1), pool.flatten(1))  # (N, M)
    best, index = distances.min(dim=1)
    return pool[index], best


@dataclass
class ForgetPicture:
    """The forgotten images and the samples drawn before the forget; :meth:`draw` samples again after it."""

    ids: list[str]
    images: torch.Tensor  # (M, C, H, W) in [0, 1]: the forgotten training images shown
    labels: tuple[int, ...] | None  # the class of the samples drawn for each image, PER_ID each
    before: SampleResult
    seed: int
    steps: int

    @classmethod
    def before_forget(cls, ward: PicturedWard, ids: list[str], seed: int = 0, steps: int = 25) -> "ForgetPicture | None":
        """Take the first ``SHOWN`` of ``ids`` that the ward holds and draw ``PER_ID`` samples of each one's class (call
        before the forget: afterwards the images are gone); None when the ward holds none of ``ids``."""
        data = ward.training_data()
        where = {sample_id: i for i, sample_id in enumerate(data.ids)}
        shown = [sample_id for sample_id in ids if sample_id in where][:SHOWN]
        if not shown:
            return None
        index = [where[sample_id] for sample_id in shown]
        labels = None if data.labels is None else tuple(int(data.labels[i]) for i in index for _ in range(PER_ID))
        before = _draw(ward, len(shown), labels, seed, steps)
        return cls(shown, (data.images[index].float() + 1) / 2, labels, before, seed, steps)

    def draw(self, ward: PicturedWard, path: Path | BinaryIO) -> Layout:
        """Sample again with the same seeds (after the forget) and write the picture: one row per forgotten image, the
        image, its ``NEAREST`` nearest samples before the forget and after, each with its distance."""
        after = _draw(ward, len(self.ids), self.labels, self.seed, self.steps)
        rows = []
        closest = {"before": [], "after": []}
        for m, sample_id in enumerate(self.ids):
            cells, notes = [self.images[m]], ["forgotten"]
            for name, result in (("before", self.before), ("after", after)):
                pool = result.images[m * PER_ID:(m + 1) * PER_ID]
                distances = pixel_distances(self.images[m], pool)
                order = distances.argsort()[:NEAREST]
                cells += list(pool[order])
                notes += [f"d {d:.2f}" for d in distances[order].tolist()]
                closest[name].append(float(distances[order[0]]))
            rows.append(Row(sample_id, torch.stack(cells), notes=notes))
        mean = {name: sum(v) / max(len(v), 1) for name, v in closest.items()}
        caption = (f"Each forgotten training image (left) beside the {NEAREST} nearest of {PER_ID} samples of its class drawn with seed "
                   f"{self.seed} before the forget and, with the same seeds, after it ({after.weights} weights over compartments "
                   f"{', '.join(map(str, after.compartments))}, {self.steps} steps). d: pixel L2 distance on images in [0, 1]; "
                   f"nearest sample on average: {mean['before']:.2f} before, {mean['after']:.2f} after.")
        groups = [("forgotten", 1), ("nearest samples before the forget", NEAREST), ("nearest samples after the forget", NEAREST)]
        return draw_rows(rows, path, caption=caption, groups=groups)


def _draw(ward: PicturedWard, count: int, labels: tuple[int, ...] | None, seed: int, steps: int) -> SampleResult:
    return ward.sample(count * PER_ID, label=labels, seed=seed, steps=steps)


def guard_rows(unguarded: torch.Tensor, guarded: torch.Tensor, train: Dataset) -> list[Row]:
    """The rows of "what a guard changed": the same seeds unguarded (with the distance to their nearest training image),
    those nearest training images, guarded (with theirs), and |guarded - unguarded| x ``DIFFERENCE_GAIN`` in red with
    each pair's largest pixel difference. Images (N, C, H, W) in [0, 1]."""
    near, d_plain = nearest_training(unguarded, train)
    _, d_guarded = nearest_training(guarded, train)
    difference = (guarded.float() - unguarded.float()).abs().amax(dim=1, keepdim=True)  # (N, 1, H, W)
    red = torch.cat([difference, difference * 0.25, difference * 0], dim=1) * DIFFERENCE_GAIN
    return [Row("unguarded", unguarded, notes=[f"d {d:.2f}" for d in d_plain.tolist()]),
            Row("nearest training", near),
            Row("guarded, same seed", guarded, notes=[f"d {d:.2f}" for d in d_guarded.tolist()]),
            Row(f"|difference| x{DIFFERENCE_GAIN}", red.clamp(0, 1), notes=[f"max {m:.2f}" for m in difference.flatten(1).amax(1).tolist()])]


def guard_caption(unguarded: SampleResult, guarded: SampleResult, seed: int) -> str:
    """What the guard picture shows, with how often the guards steered and how much they changed."""
    steered = 100 * (guarded.guard_guided or 0.0)
    changed = float((guarded.images - unguarded.images).abs().max())
    verdict = ("the guards never steered, so the guarded samples are the unguarded ones" if changed == 0.0 else
               f"largest pixel change {changed:.2f}")
    return (f"What a guard changed: {len(guarded.images)} samples of compartments {', '.join(map(str, guarded.compartments))} drawn with seed "
            f"{seed} unguarded and guarded (the same seeds); guards steered {steered:.1f}% of their checks; {verdict}. d: pixel L2 "
            "distance to the nearest training image (images in [0, 1]).")


def guard_picture(ward: PicturedWard, path: Path | BinaryIO, n: int = 12, seed: int = 0, steps: int = 50,
                  allowed: list[int] | None = None) -> SampleResult:
    """Sample ``n`` images unguarded and guarded with the same seed, write "what a guard changed" (:func:`guard_rows`,
    against the allowed compartments' training images) and return the guarded samples."""
    unguarded = ward.sample(n, seed=seed, steps=steps, allowed=allowed)
    guarded = ward.sample(n, seed=seed, steps=steps, allowed=allowed, guard=True)
    parts = [ward.training_data(c) for c in guarded.compartments]
    train = Dataset(tuple(i for p in parts for i in p.ids), torch.cat([p.images for p in parts]), None)
    draw_rows(guard_rows(unguarded.images, guarded.images, train), path, caption=guard_caption(unguarded, guarded, seed))
    return guarded
