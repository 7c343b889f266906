"""Pictures (PNG) of samples for the CLI, the demo and the audit report: sample grids with one labelled row per class
and each sample's attribution as a coloured strip under it, and labelled rows of images side by side (a forgotten
image beside its nearest samples, guarded beside unguarded samples). Drawn with Pillow in the font matplotlib ships:
every image pixel is the sample's own, upscaled by an integer factor and never resampled."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_BAND = 13  # pixels under an image for its note (a distance)
STRIP = 5  # pixels of the attribution strip under an image
CAPTION_LINE = 14  # pixels per caption line above the picture
CAPTION_SIZE = 11  # caption and label font size in pixels
GROUP_GAP = 12  # pixels between groups of columns
PAD = 2  # pixels between images
BACKGROUND = 40
TEXT = (235, 235, 235)
NOTE = (255, 200, 0)
# one colour per compartment (the audit's figures use the same)
PALETTE = ["#3b6fb6", "#e07b39", "#4c9a5b", "#c04a4a", "#8a6bb8", "#8c6d4f", "#d27db5", "#7f7f7f", "#b5b83a", "#3bb5c4"]


@dataclass(frozen=True)
class Row:
    """One row of a picture: its label (written left of it), its images and, under each image, an optional note and an
    optional strip of its attribution shares (one colour per compartment)."""

    label: str
    images: torch.Tensor  # (n, C, H, W) in [0, 1]
    notes: Sequence[str] | None = None  # one short text per image
    shares: torch.Tensor | None = None  # (n, K) attribution per compartment


@dataclass
class Layout:
    """Where a picture put what it drew."""

    size: tuple[int, int]  # (height, width) of the PNG
    cell: tuple[int, int]  # (height, width) of an image as drawn
    cells: list[list[tuple[int, int]]] = field(default_factory=list)  # per row, (y, x) of each image's top-left corner
    labels: list[tuple[int, int]] = field(default_factory=list)  # per row, (y, x) where its label starts


def pixels(images: torch.Tensor, scale: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 (N, H*scale, W*scale, 3): each pixel repeated, grey images as RGB."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    return x.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()


def grid_array(images: torch.Tensor, columns: int | None = None, scale: int = 4, pad: int = PAD) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> uint8 (rows*H', cols*W', 3) grid of the images upscaled by ``scale`` (the API's ``grid_png``)."""
    n, _, h, w = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    canvas = np.full((rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad, 3), BACKGROUND, dtype=np.uint8)
    for i, block in enumerate(pixels(images, scale)):
        r, c = divmod(i, columns)
        y, x = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        canvas[y:y + h * scale, x:x + w * scale] = block
    return canvas


def grid_scale(image_size: int) -> int:
    """How much a picture upscales ``image_size``-pixel images so each is seen at 64 px or more (8x for 8x8 digits)."""
    return max(1, -(-64 // image_size))


def image_grid(images: torch.Tensor, path: Path | BinaryIO, labels: torch.Tensor | None = None, columns: int | None = None,
               scale: int | None = None, caption: str | None = None, attribution: torch.Tensor | None = None) -> Layout:
    """A PNG grid of (N, C, H, W) images in [0, 1] with ``caption`` above it. With ``labels``: one row per class asked
    for (sorted), labelled "class k (count)" on its left, so the rows' lengths are the class histogram (a class with
    more than ``columns`` samples, 16 by default, continues on the next row). With ``attribution`` (N, K), column k
    being compartment k: a strip under each image coloured by the share each compartment made of it, and a legend of
    the compartments that made any part of any sample."""
    n = images.shape[0]
    if labels is None:
        columns = columns or int(np.ceil(np.sqrt(n)))
        chunks = [("", torch.arange(i, min(i + columns, n))) for i in range(0, n, columns)]
    else:
        columns = columns or 16
        chunks = []
        for k in sorted(set(labels.tolist())):
            index = torch.nonzero(labels == k).flatten()
            chunks += [(f"class {k} ({len(index)})" if i == 0 else "", index[i:i + columns]) for i in range(0, len(index), columns)]
    several = attribution is not None and attribution.shape[1] > 1
    rows = [Row(label, images[index], shares=attribution[index] if several else None) for label, index in chunks]
    legend = [k for k in range(attribution.shape[1]) if float(attribution[:, k].sum()) > 0] if several else None
    return draw_rows(rows, path, caption=caption, scale=scale, legend=legend)


def draw_rows(rows: Sequence[Row], path: Path | BinaryIO, caption: str | None = None, scale: int | None = None,
              groups: Sequence[tuple[str, int]] | None = None, legend: Sequence[int] | None = None) -> Layout:
    """Write a PNG of labelled rows of images: ``caption`` above (wrapped to the width), then ``groups`` (header, number
    of columns) as headers over consecutive columns with a gap between groups, then each row, and ``legend`` (the
    compartments, by their column in the attribution strips) below. ``path``: a file name or a binary stream."""
    h, w = rows[0].images.shape[-2:]
    scale = scale or grid_scale(max(h, w))
    ih, iw = h * scale, w * scale
    font = caption_font()
    notes = any(r.notes for r in rows)
    strips = any(r.shares is not None for r in rows)
    band = (LABEL_BAND if notes else 0) + (STRIP + 1 if strips else 0)
    margin = max((int(font.getlength(r.label)) + 10 for r in rows if r.label), default=0)
    group_of = [g for g, (_, count) in enumerate(groups or []) for _ in range(count)]
    columns = max(len(r.images) for r in rows)
    xs = [margin + PAD + j * (iw + PAD) + GROUP_GAP * (group_of[j] if j < len(group_of) else 0) for j in range(columns)]
    width = max(xs[-1] + iw + PAD, 240)
    lines = wrap_to_width(caption, font, width - 8) if caption else []
    top = len(lines) * CAPTION_LINE + (4 if lines else 0) + (CAPTION_LINE if groups else 0)
    step = ih + band + PAD
    height = top + PAD + len(rows) * step + (CAPTION_LINE + 4 if legend else 0)
    img = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * CAPTION_LINE), line, fill=TEXT, font=font)
    start = 0
    for header, count in groups or []:
        draw.text((xs[start], top - CAPTION_LINE), header, fill=TEXT, font=font)
        start += count
    layout = Layout((height, width), (ih, iw))
    for r, row in enumerate(rows):
        y = top + PAD + r * step
        layout.labels.append((y + ih // 2 - CAPTION_SIZE // 2 - 1, 4))
        draw.text(layout.labels[-1][::-1], row.label, fill=TEXT, font=font)
        layout.cells.append([(y, xs[j]) for j in range(len(row.images))])
        for j, block in enumerate(pixels(row.images, scale)):
            img.paste(Image.fromarray(block), (xs[j], y))
            if row.notes:
                draw.text((xs[j] + 1, y + ih), row.notes[j], fill=NOTE, font=font)
            if row.shares is not None:
                _strip(draw, row.shares[j], xs[j], y + ih + band - STRIP, iw)
    if legend:
        x = 4
        for c in legend:
            draw.rectangle((x, height - CAPTION_LINE, x + 9, height - CAPTION_LINE + 9), fill=PALETTE[c % len(PALETTE)])
            draw.text((x + 13, height - CAPTION_LINE - 2), f"compartment {c}", fill=TEXT, font=font)
            x += 20 + int(font.getlength(f"compartment {c}"))
    img.save(path, format="PNG")
    return layout


def _strip(draw: ImageDraw.ImageDraw, shares: torch.Tensor, x: int, y: int, width: int) -> None:
    """A bar ``width`` pixels long cut into one coloured part per compartment, each as long as its share."""
    edges = np.round(np.cumsum([0.0] + shares.clamp(min=0).tolist()) / max(float(shares.clamp(min=0).sum()), 1e-12) * width).astype(int)
    for k in range(len(shares)):
        if edges[k + 1] > edges[k]:
            draw.rectangle((x + edges[k], y, x + edges[k + 1] - 1, y + STRIP - 1), fill=PALETTE[k % len(PALETTE)])


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
