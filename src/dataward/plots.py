"""Pictures: sample grids (PNG) used by the CLI, the demo and the audit report."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_BAND = 12  # pixels under each image for its label
CAPTION_LINE = 14  # pixels per caption line above the grid
CAPTION_SIZE = 11  # caption and label font size in pixels
BACKGROUND = 40


def grid_array(images: torch.Tensor, columns: int | None = None, scale: int = 4, pad: int = 2, band: int = 0) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 (rows*H', cols*W', 3) grid, each image upscaled by ``scale``, with ``band`` empty
    pixels under each image (for its label)."""
    n, c, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    cell_h, cell_w = h * scale + band + pad, w * scale + pad
    canvas = np.full((rows * cell_h + pad, columns * cell_w + pad, 3), BACKGROUND, dtype=np.uint8)
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1) if c == 1 else x
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, columns)
        canvas[pad + r * cell_h : pad + r * cell_h + h * scale, pad + col * cell_w : pad + col * cell_w + w * scale] = x[i]
    return canvas


def grid_scale(image_size: int) -> int:
    """How much a grid upscales ``image_size``-pixel images so each is seen at 64 px or more (8x for 8x8 digits)."""
    return max(1, -(-64 // image_size))


def image_grid(images: torch.Tensor, path: Path, labels: torch.Tensor | None = None, columns: int | None = None, scale: int = 6,
               caption: str | None = None) -> Path:
    """Write a PNG grid of (N, C, H, W) images in [0, 1]: ``caption`` above it (wrapped to the grid's width) and each
    label, when given, in a band under its image (never over it)."""
    n, _, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    band = LABEL_BAND if labels is not None else 0
    grid = grid_array(images, columns, scale, band=band)
    font = caption_font()
    lines = wrap_to_width(caption, font, grid.shape[1] - 8) if caption else []
    top = len(lines) * CAPTION_LINE + (4 if lines else 0)
    img = Image.new("RGB", (grid.shape[1], grid.shape[0] + top), (BACKGROUND,) * 3)
    img.paste(Image.fromarray(grid), (0, top))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * CAPTION_LINE), line, fill=(235, 235, 235), font=font)
    if labels is not None:
        cell_h, cell_w = h * scale + band + 2, w * scale + 2
        for i, label in enumerate(labels.tolist()):
            r, col = divmod(i, columns)
            draw.text((2 + col * cell_w + 1, top + 1 + r * cell_h + h * scale), str(label), fill=(255, 200, 0), font=font)
    img.save(path)
    return Path(path)


@functools.lru_cache(maxsize=1)
def caption_font() -> ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib), which has ε, δ, σ and proper spaces; Pillow's default bitmap font has
    neither the Greek letters (drawn as boxes) nor word spaces wide enough to read."""
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), CAPTION_SIZE)


def wrap_to_width(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """``text`` as lines of whole words, each at most ``width`` pixels wide in ``font`` (a longer word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        joined = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(joined) <= width:
            lines[-1] = joined
        else:
            lines.append(word)
    return lines
