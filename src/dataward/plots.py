"""Pictures: sample grids (PNG) used by the CLI, the demo and the audit report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def grid_array(images: torch.Tensor, columns: int | None = None, scale: int = 4, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 (rows*H', cols*W', 3) grid, each image upscaled by ``scale``."""
    n, c, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((rows * cell_h + pad, columns * cell_w + pad, 3), 40, dtype=np.uint8)
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1) if c == 1 else x
    x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, col = divmod(i, columns)
        canvas[pad + r * cell_h : pad + r * cell_h + h * scale, pad + col * cell_w : pad + col * cell_w + w * scale] = x[i]
    return canvas


def image_grid(images: torch.Tensor, path: Path, labels: torch.Tensor | None = None, columns: int | None = None, scale: int = 6) -> Path:
    """Write a PNG grid of (N, C, H, W) images in [0, 1]; labels, when given, are written under each cell."""
    array = grid_array(images, columns, scale)
    img = Image.fromarray(array)
    if labels is not None:
        n, _, h, w = images.shape
        columns = columns or int(np.ceil(np.sqrt(n)))
        draw = ImageDraw.Draw(img)
        for i, label in enumerate(labels.tolist()):
            r, col = divmod(i, columns)
            draw.text((2 + col * (w * scale + 2) + 2, 2 + r * (h * scale + 2) + 1), str(label), fill=(255, 200, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
