"""Reading a user's ``.npz`` within bounds: only the arrays dataward uses (``images``, ``labels``, ``ids``, ``owners``;
any other member is never decompressed), each checked from its ``.npy`` header (shape, dtype, size) before a byte of
its data is decompressed, and never unpickled. A zip archive compresses a field of zeros a thousandfold, so the file's
size says nothing about what loading it costs: the header does.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from dataward.errors import DatawardError

NPZ_ARRAYS = ("images", "labels", "ids", "owners")  # the arrays dataward reads from an npz
MAX_NPZ_VALUES = 100_000_000  # pixel values in an npz's images, all images together (400 MB as float32)
MAX_NPZ_ARRAY_BYTES = 400_000_000  # bytes of any one array as stored (after decompression)


def _header(archive: zipfile.ZipFile, member: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of one ``.npy`` member, read from its header alone."""
    try:
        with archive.open(member) as stream:
            version = np.lib.format.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]} (np.savez writes 1.0 or 2.0)")
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DatawardError(f"cannot read {path} as an npz without pickles: member {member}: {error}") from None
    return shape, dtype


def _check(path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, max_side: int) -> None:
    """Refuse an array over the limits, naming the file, the array and the limit."""
    if name == "images":
        if any(side > max_side for side in shape[1:]):
            raise DatawardError(f"{path}: 'images' has shape {shape}; images in an npz may be at most {max_side} pixels per "
                                f"side: downscale them first (the ward trains at 8-64 px)")
        if math.prod(shape) > MAX_NPZ_VALUES:
            raise DatawardError(f"{path}: 'images' {shape} holds {math.prod(shape):,} pixel values, above the {MAX_NPZ_VALUES:,} "
                                "dataward reads from one npz: use fewer or smaller images")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_NPZ_ARRAY_BYTES:
        raise DatawardError(f"{path}: '{name}' {shape} of {dtype} is {nbytes:,} bytes unpacked, above the {MAX_NPZ_ARRAY_BYTES:,} "
                            "dataward reads per array from an npz")


def read_npz(path: Path, max_side: int) -> dict[str, np.ndarray]:
    """The arrays of :data:`NPZ_ARRAYS` that the npz at ``path`` holds (``images`` is required), each refused before
    loading when over the limits: images at most ``max_side`` pixels per side and :data:`MAX_NPZ_VALUES` values, any
    array at most :data:`MAX_NPZ_ARRAY_BYTES` bytes."""
    if not zipfile.is_zipfile(path):
        raise DatawardError(f"cannot read {path}: not an .npz file (an npz is a zip archive of .npy arrays, as np.savez writes)")
    try:
        with zipfile.ZipFile(path) as archive:
            members = {m.removesuffix(".npy"): m for m in archive.namelist()}
            if "images" not in members:
                raise DatawardError(f"{path} has no 'images' array (found: {', '.join(members) or 'nothing'})")
            headers = {name: _header(archive, members[name], path) for name in NPZ_ARRAYS if name in members}
    except (OSError, zipfile.BadZipFile) as error:
        raise DatawardError(f"cannot read {path} as an npz without pickles: {error}") from None
    for name, (shape, dtype) in headers.items():
        _check(path, name, shape, dtype, max_side)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in headers}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise DatawardError(f"cannot read {path} as an npz without pickles: {error}") from None
