"""Input that must be bounded or refused, never silently dropped (issue 35 items 11 and 14): npz sizes checked from the
headers before loading, folder images held at the documented size, nested class sub-folders refused."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from dataward.data import MAX_WORKING_SIDE, load_source
from dataward.errors import DatawardError
from dataward.npzfile import MAX_NPZ_ARRAY_BYTES, MAX_NPZ_VALUES


def npz_with_headers(path, **shapes):
    """An npz whose members hold only a .npy header claiming ``shape`` (uint8; the data is left out: a refusal made from
    the header never reads it). ``images`` of shape (2, 8, 8) is written whole unless given."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        if "images" not in shapes:
            buffer = io.BytesIO()
            np.save(buffer, np.zeros((2, 8, 8), dtype=np.uint8))
            archive.writestr("images.npy", buffer.getvalue())
        for name, shape in shapes.items():
            buffer = io.BytesIO()
            np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
            archive.writestr(f"{name}.npy", buffer.getvalue())
    return f"npz:{path}"


@pytest.mark.parametrize("shape, message", [
    ((1, 16000, 16000), f"at most {MAX_WORKING_SIDE} pixels per side"),  # one 256 MB image in a file of a few hundred bytes
    ((1, 3, 300, 8), f"at most {MAX_WORKING_SIDE} pixels per side"),
    ((MAX_NPZ_VALUES // 64 + 1, 8, 8), f"above the {MAX_NPZ_VALUES:,}"),
])
def test_npz_images_over_the_limits_are_refused_from_the_header(tmp_path, shape, message):
    """Issue 35 item 11: a 249 KB npz holding one 16000² image peaked at 3.7 GB; now refused before anything is read."""
    with pytest.raises(DatawardError, match=f"d.npz: 'images' .*{message}"):
        load_source(npz_with_headers(tmp_path / "d.npz", images=shape))


def test_npz_reads_only_its_arrays_and_bounds_each(tmp_path):
    d = load_source(npz_with_headers(tmp_path / "d.npz", notes=(10**12,)))  # a member dataward does not use: never read
    assert d.images.shape == (2, 1, 8, 8)
    with pytest.raises(DatawardError, match=f"'ids' .* above the {MAX_NPZ_ARRAY_BYTES:,} dataward reads per array"):
        load_source(npz_with_headers(tmp_path / "e.npz", ids=(MAX_NPZ_ARRAY_BYTES + 1,)))


def test_npz_integer_images_scale_as_before(tmp_path):
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez(tmp_path / "d.npz", images=images)
    d = load_source(f"npz:{tmp_path / 'd.npz'}")
    expected = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(images.max()) * 2.0 - 1.0
    assert d.images.shape == (2, 3, 4, 4) and np.array_equal(d.images.numpy(), expected.astype(np.float32))


def test_folder_images_are_decoded_at_the_documented_size(tmp_path):
    """Issue 35 item 11: folder images were decoded at 2 x 256 px (3.1 MB each as RGB float32) and all held at once."""
    import tracemalloc

    for k in range(8):
        Image.new("RGB", (1000, 800), (40 * k, 0, 0)).save(tmp_path / f"{k}.png")
    tracemalloc.start()
    try:
        d = load_source(f"folder:{tmp_path}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert d.images.shape == (8, 3, MAX_WORKING_SIDE, MAX_WORKING_SIDE)
    one_image = MAX_WORKING_SIDE * MAX_WORKING_SIDE * 3 * 4  # bytes of one RGB float32 image at the working size
    assert peak < 4 * one_image, peak  # numpy's decoded arrays: one image at a time at most 256 px per side (was 8 at 512)


def test_images_in_nested_class_sub_folders_are_refused_not_dropped(tmp_path):
    """Issue 35 item 14: a class folder's sub-folder was skipped without a word (6 of 7 images loaded)."""
    (tmp_path / "cat" / "kittens").mkdir(parents=True)
    for k in range(3):
        Image.new("L", (8, 8), 40 * k).save(tmp_path / "cat" / f"{k}.png")
    Image.new("L", (8, 8)).save(tmp_path / "cat" / "kittens" / "x.png")
    with pytest.raises(DatawardError, match="class folder .*cat holds sub-folder.* kittens"):
        load_source(f"folder:{tmp_path}")
    (tmp_path / "cat" / "kittens" / "x.png").rename(tmp_path / "cat" / "3.png")
    (tmp_path / "cat" / "kittens").rmdir()
    (tmp_path / "cat" / ".thumbnails").mkdir()  # hidden folders are not images
    assert len(load_source(f"folder:{tmp_path}")) == 4
