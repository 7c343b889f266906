"""Coloured shapes: a small RGB data set the project draws itself (Pillow), for trying and testing RGB wards at real sizes
without any download. ``shapes:count=N,seed=S,size=P`` as a data source; :func:`write_shapes_folder` writes the same
images as a ``folder:`` data set (one sub-folder per class, PNG files), the way users bring their own images.

Three classes (circle, square, triangle), each drawn in a random colour, size and position on a random background colour.
:func:`draw_shape` draws one shape as told (also the cross and the ring): :mod:`dataward.captions` draws its captioned
shapes with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dataward.errors import DatawardError

SHAPE_CLASSES = ("circle", "square", "triangle")  # the classes of the ``shapes`` source
SHAPE_KINDS = SHAPE_CLASSES + ("cross", "ring")  # every shape :func:`draw_shape` draws (captioned shapes use all)


def draw_shape(kind: str, ink: tuple[int, int, int], background: tuple[int, int, int], centre: tuple[float, float],
               radius: float, rotation: float, size: int) -> Image.Image:
    """One shape (a name of ``SHAPE_KINDS``) of colour ``ink`` on ``background``, drawn on a canvas of 4 * ``size`` px
    (``centre`` and ``radius`` in its pixels, ``rotation`` in degrees), then downsampled to ``size`` px (anti-aliased edges)."""
    canvas = 4 * size
    img = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(img)
    (cx, cy), r = centre, radius
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif kind in ("square", "triangle"):
        draw.regular_polygon((cx, cy, r), 4 if kind == "square" else 3, rotation=rotation, fill=ink)
    elif kind == "cross":  # two bars of a third of its width, turned by ``rotation``
        bar = [(-r, -r / 3), (r, -r / 3), (r, r / 3), (-r, r / 3)]
        turn = np.deg2rad(rotation)
        for quarter in (0.0, np.pi / 2):
            c, s = np.cos(turn + quarter), np.sin(turn + quarter)
            draw.polygon([(cx + c * x - s * y, cy + s * x + c * y) for x, y in bar], fill=ink)
    elif kind == "ring":  # a disc with a hole of half its radius
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
        draw.ellipse((cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2), fill=background)
    else:
        raise DatawardError(f"unknown shape {kind!r}: expected one of {', '.join(SHAPE_KINDS)}")
    return img.resize((size, size), Image.LANCZOS)


def _draw(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    background, ink = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(background - ink).sum() < 200:  # keep the shape visible
        ink = rng.integers(0, 256, 3)
    canvas = 4 * size
    radius = rng.uniform(0.2, 0.4) * canvas
    cx, cy = rng.uniform(radius, canvas - radius, 2)
    rotation = 0.0 if label == 0 else float(rng.uniform(0, 90 if label == 1 else 120))
    ink_rgb, background_rgb = tuple(int(v) for v in ink), tuple(int(v) for v in background)
    return draw_shape(SHAPE_CLASSES[label], ink_rgb, background_rgb, (cx, cy), radius, rotation, size)  # type: ignore[arg-type]


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
