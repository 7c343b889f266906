"""Reading a user's image files within bounds: the size is checked from the header before anything is decoded, and
images are held at most ``MAX_WORKING_SIDE`` per side (the folder sources of :mod:`dataward.data`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dataward.errors import DatawardError

MAX_IMAGE_PIXELS = 50_000_000  # an image file above this is refused before it is decoded (the file is named)
MAX_WORKING_SIDE = 256  # folder images are decoded and held, npz images accepted, at most this large per side (the presets stop at 64)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def read_image(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """One image in [0, 1] (H, W) or (H, W, 3), decoded at most ``MAX_WORKING_SIDE`` per side, and its (H, W) in the file."""
    try:
        with Image.open(path) as img:
            width, height = img.size  # from the header: nothing is decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise DatawardError(f"image {path} is {width}x{height} pixels, above the {MAX_IMAGE_PIXELS:,} dataward reads: "
                                    f"downscale it first (the ward trains at 8-64 px)")
            img.draft(None, (MAX_WORKING_SIDE, MAX_WORKING_SIDE))  # JPEG: decode at a reduced scale (at least this large)
            img.load()
            if max(img.size) > MAX_WORKING_SIDE:
                img.thumbnail((MAX_WORKING_SIDE, MAX_WORKING_SIDE))
            mode = "L" if img.mode in ("1", "L", "I", "I;16", "F", "LA", "P") and img.mode != "P" else "RGB"
            return np.asarray(img.convert(mode), dtype=np.float32) / 255.0, (height, width)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as error:
        raise DatawardError(f"cannot read image {path}: {error}") from None
