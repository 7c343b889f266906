"""Captioned images for text-to-image models (issue 32): a generated captioned shapes source and the folder convention of
diffusers' text-to-image training.

**Captioned shapes** (``captioned-shapes:split=public,count=N,seed=S,size=P``): one shape per image (drawn by
:func:`dataward.shapes.draw_shape`) and a caption from one fixed grammar that states five checkable attributes::

    a {size} {colour} {shape} {position} on a {background} background

e.g. "a large red circle on the left on a black background". The ``public`` split (the base's data) uses the public
shapes and colours only; private split ``privateK`` holds ``NOVELTIES[K]`` (a shape or a colour the public split never
shows) in every image, with the other attributes drawn as in the public split, so a compartment trained on it measurably
adds knowledge. Sample IDs are ``captioned-shapes:{split}:{seed}:{i:06d}``.

**metadata.jsonl folders**: an image folder with a ``metadata.jsonl`` whose lines are ``{"file_name": ..., "text": ...}``
(file names relative to the folder, the way diffusers' ``imagefolder`` reads them); the file name is the sample ID.
:func:`read_metadata` checks it whole before any image is read; :mod:`dataward.data` reads the images.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from dataward.errors import DatawardError, echo
from dataward.shapes import draw_shape

METADATA_FILE = "metadata.jsonl"
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
           "purple": (140, 50, 190), "orange": (245, 140, 20)}  # ink colours (RGB)
BACKGROUNDS = {"black": (20, 20, 20), "white": (240, 240, 240), "grey": (128, 128, 128)}
SIZES = {"small": (0.10, 0.14), "large": (0.22, 0.27)}  # radius range as a share of the image side
POSITIONS = {"in the centre": (0.5, 0.5), "on the left": (0.3, 0.5), "on the right": (0.7, 0.5),
             "at the top": (0.5, 0.3), "at the bottom": (0.5, 0.7)}  # centre (x, y) as shares of the side
POSITION_JITTER = 0.04  # the centre moves at most this share of the side from its position's point
PUBLIC_SHAPES = ("circle", "square", "triangle")
PUBLIC_COLOURS = ("red", "green", "blue", "yellow")
NOVELTIES = (("shape", "cross"), ("colour", "purple"), ("shape", "ring"), ("colour", "orange"))  # what private split K adds
SPLITS = ("public",) + tuple(f"private{k}" for k in range(len(NOVELTIES)))
CAPTION_PATTERN = re.compile(r"a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) (?P<position>(?:in|on|at) the \w+) "
                             r"on a (?P<background>\w+) background")


@dataclass(frozen=True)
class ShapeCaption:
    """The attributes one captioned shape states (each a key of its table above, or a shape name)."""

    size: str
    colour: str
    shape: str
    position: str
    background: str

    @property
    def text(self) -> str:
        """The caption, in the one grammar."""
        return f"a {self.size} {self.colour} {self.shape} {self.position} on a {self.background} background"

    @classmethod
    def parse(cls, text: str) -> "ShapeCaption":
        """The attributes a caption of the grammar states; anything else is refused, quoting it."""
        match = CAPTION_PATTERN.fullmatch(text)
        if match is None:
            raise DatawardError(f"caption {echo(text)!r} does not follow the captioned shapes grammar "
                                f"'a SIZE COLOUR SHAPE POSITION on a BACKGROUND background'")
        return cls(**match.groupdict())


def caption_words() -> tuple[str, ...]:
    """Every word the grammar can write, sorted (what the local tokenizer learns as whole tokens)."""
    shapes = PUBLIC_SHAPES + tuple(value for kind, value in NOVELTIES if kind == "shape")
    text = " ".join([*SIZES, *COLOURS, *shapes, *POSITIONS, *BACKGROUNDS, "a on background"])
    return tuple(sorted(set(text.split())))


def _choose(rng: np.random.Generator, split: str) -> ShapeCaption:
    """One caption of ``split``: one draw per attribute, in the dataclass's order."""
    size, colour, shape, position, background = (options[int(rng.integers(len(options)))] for options in
                                                  (tuple(SIZES), PUBLIC_COLOURS, PUBLIC_SHAPES, tuple(POSITIONS), tuple(BACKGROUNDS)))
    caption = ShapeCaption(size, colour, shape, position, background)
    if split == "public":
        return caption
    kind, value = NOVELTIES[int(split.removeprefix("private"))]
    return ShapeCaption(caption.size, value if kind == "colour" else caption.colour, value if kind == "shape" else caption.shape,
                        caption.position, caption.background)


def captioned_shapes(split: str = "public", count: int = 600, seed: int = 0, size: int = 32) -> tuple[tuple[str, ...], torch.Tensor, tuple[str, ...]]:
    """``count`` captioned shapes of ``split`` drawn from ``seed``: sample IDs, images (N, 3, size, size) in [-1, 1], captions."""
    if split not in SPLITS:
        raise DatawardError(f"unknown captioned shapes split {split!r}: expected one of {', '.join(SPLITS)}")
    if count <= 0 or size < 8:
        raise DatawardError(f"captioned shapes need a positive count and a size of at least 8 px, got count={count}, size={size}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    canvas, pixels, captions = 4 * size, [], []
    for _ in range(count):
        caption = _choose(rng, split)
        radius = rng.uniform(*SIZES[caption.size]) * canvas
        centre = (np.array(POSITIONS[caption.position]) + rng.uniform(-POSITION_JITTER, POSITION_JITTER, 2)) * canvas
        image = draw_shape(caption.shape, COLOURS[caption.colour], BACKGROUNDS[caption.background], (float(centre[0]), float(centre[1])),
                           radius, float(rng.uniform(0, 360)), size)
        pixels.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        captions.append(caption.text)
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()  # (N, 3, size, size)
    return tuple(f"captioned-shapes:{split}:{seed}:{i:06d}" for i in range(count)), images, tuple(captions)


def write_captioned_folder(folder: str | Path, split: str = "public", count: int = 60, seed: int = 0, size: int = 32) -> Path:
    """Write captioned shapes as ``folder/NNNNN.png`` and ``folder/metadata.jsonl`` (a ``folder:`` data set); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, images, captions = captioned_shapes(split, count, seed, size)
    pixels = ((images.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    from PIL import Image

    lines = []
    for i, (array, caption) in enumerate(zip(pixels, captions)):
        Image.fromarray(array).save(folder / f"{i:05d}.png")
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": caption}))
    (folder / METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _record(path: Path, number: int, line: str) -> tuple[str, str]:
    """``(file_name, text)`` of line ``number`` of ``path``, or an error naming the file and the line."""
    where = f"{path} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatawardError(f"{where} is not valid JSON ({error.msg}): expected {{\"file_name\": ..., \"text\": ...}}") from None
    if not isinstance(record, dict) or not isinstance(record.get("file_name"), str) or "text" not in record:
        raise DatawardError(f"{where} must be a JSON object with a string \"file_name\" and a \"text\" caption")
    if not isinstance(record["text"], str) or not record["text"].strip():
        raise DatawardError(f"{where}: the caption (\"text\") of {echo(record['file_name'])!r} is empty: every image needs one")
    name = PurePosixPath(record["file_name"])
    if not record["file_name"] or name.is_absolute() or ".." in name.parts or "\\" in record["file_name"]:
        raise DatawardError(f"{where}: file_name {echo(record['file_name'])!r} must be a path inside the folder (relative, with /)")
    return name.as_posix(), record["text"]


def read_metadata(root: Path, image_suffixes: set[str]) -> tuple[list[Path], list[str]]:
    """The images a ``metadata.jsonl`` folder lists and their captions, in the file's order, all checked before any
    image is read: a bad JSON line, a missing key, an empty caption, a name outside the folder, a duplicate name, a
    listed file that is missing or not an image, or an image the file does not list, each named with file and line."""
    path = root / METADATA_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatawardError(f"{path} is not UTF-8 text") from None
    files, captions, first_line = [], [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, text = _record(path, number, line)
        if name in first_line:
            raise DatawardError(f"{path} line {number}: file_name {echo(name)!r} is listed twice (first on line {first_line[name]})")
        first_line[name] = number
        file = root / name
        if not file.is_file():
            raise DatawardError(f"{path} line {number}: file {echo(name)!r} does not exist in {root}")
        if file.suffix.lower() not in image_suffixes:
            raise DatawardError(f"{path} line {number}: {echo(name)!r} is not an image file (expected one of {', '.join(sorted(image_suffixes))})")
        files.append(file)
        captions.append(text)
    if not files:
        raise DatawardError(f"{path} lists no images")
    unlisted = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix.lower() in image_suffixes
                      and p.relative_to(root).as_posix() not in first_line and not p.name.startswith("."))
    if unlisted:
        raise DatawardError(f"{path} does not list {len(unlisted)} image(s) of {root} (e.g. {echo(unlisted[0])!r}): every image needs a caption "
                            f"line, or move it out of the folder")
    return files, captions
