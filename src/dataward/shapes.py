"""Coloured shapes: a small RGB data set the project draws itself (Pillow), for trying and testing RGB wards at real sizes
without any download. ``shapes:count=N,seed=S,size=P`` as a data source; :func:`write_shapes_folder` writes the same
images as a ``folder:`` data set (one sub-folder per class, PNG files), the way users bring their own images.

Three classes (circle, square, triangle), each drawn in a random colour, size and position on a random background colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dataward.errors import DatawardError

SHAPE_CLASSES = ("circle", "square", "triangle")


def _draw(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    background, ink = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(background - ink).sum() < 200:  # keep the shape visible
        ink = rng.integers(0, 256, 3)
    canvas = 4 * size  # drawn at 4x, then downsampled (anti-aliased edges)
    img = Image.new("RGB", (canvas, canvas), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(img)
    radius = rng.uniform(0.2, 0.4) * canvas
    cx, cy = rng.uniform(radius, canvas - radius, 2)
    fill = tuple(int(v) for v in ink)
    if label == 0:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif label == 1:
        draw.regular_polygon((cx, cy, radius), 4, rotation=float(rng.uniform(0, 90)), fill=fill)
    else:
        draw.regular_polygon((cx, cy, radius), 3, rotation=float(rng.uniform(0, 120)), fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def shape_images(count: int, seed: int = 0, size: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    """``count`` shape images (RGB, ``size`` px) and their labels, drawn from ``seed``."""
    if count <= 0 or size < 8:
        raise DatawardError(f"shapes need a positive count and a size of at least 8 px, got count={count}, size={size}")
    rng = np.random.default_rng(seed)
    labels = np.arange(count, dtype=np.int64) % len(SHAPE_CLASSES)
    rng.shuffle(labels)
    return [_draw(rng, int(label), size) for label in labels], labels


def shape_tensors(count: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``shapes`` data source's arrays: images (N, 3, size, size) in [-1, 1] and labels (N,)."""
    images, labels = shape_images(count, seed, size)
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1.0 for im in images])).permute(0, 3, 1, 2)
    return x.contiguous(), torch.from_numpy(labels)


def write_shapes_folder(folder: str | Path, count: int, seed: int = 0, size: int = 32) -> Path:
    """Write ``count`` shapes as ``folder/<class>/<i>.png`` (a ``folder:`` data set); returns the folder."""
    folder = Path(folder)
    images, labels = shape_images(count, seed, size)
    for name in SHAPE_CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        image.save(folder / SHAPE_CLASSES[label] / f"{i:05d}.png")
    return folder
