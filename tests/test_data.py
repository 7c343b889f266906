"""Data sources and every bad input: errors name the file or the ID."""

import numpy as np
import pytest
import torch
from PIL import Image

from dataward.data import Dataset, ids_hash, load_source
from dataward.errors import DatawardError


def test_digits_split_is_fixed_and_disjoint():
    train, heldout = load_source("digits"), load_source("digits:heldout")
    assert len(train) == 1500 and len(heldout) == 297
    assert not set(train.ids) & set(heldout.ids)
    assert train.images.shape == (1500, 1, 8, 8)
    assert float(train.images.min()) == -1.0 and float(train.images.max()) == 1.0
    assert load_source("digits").ids == train.ids  # stable across loads


def test_digits_subset_is_seeded_subset_of_train():
    a, b = load_source("digits:subset=64"), load_source("digits:subset=64")
    assert a.ids == b.ids and len(a) == 64
    assert set(a.ids) <= set(load_source("digits").ids)
    assert load_source("digits:subset=64,seed=1").ids != a.ids


def test_printed_digits_are_seeded_and_labelled():
    a, b = load_source("printed:count=50"), load_source("printed:count=50")
    assert torch.equal(a.images, b.images) and a.ids == b.ids
    assert a.images.shape == (50, 1, 8, 8) and set(a.labels.tolist()) == set(range(10))
    assert not torch.equal(load_source("printed:count=50,seed=1").images, a.images)
    # a digit has ink: every image has some bright pixels and a dark background
    assert (a.images.flatten(1).max(1).values > 0.2).all() and (a.images.flatten(1).min(1).values < -0.9).all()
    # made like the UCI digits: ink counts of 4x4 blocks of a binary bitmap (0..16), the glyph filling its height
    counts = (a.images + 1) / 2 * 16
    assert torch.allclose(counts, counts.round(), atol=1e-4)
    assert (a.images[:, 0, 0].max(1).values > -1).all() and (a.images[:, 0, -1].max(1).values > -1).all()
    assert load_source("printed:count=10,size=16").images.shape == (10, 1, 16, 16)


def test_strokes_are_seeded_unlabelled_and_inked():
    a, b = load_source("strokes:count=40"), load_source("strokes:count=40")
    assert torch.equal(a.images, b.images) and a.ids == b.ids and a.ids[0] == "strokes:0:000000"
    assert a.images.shape == (40, 1, 8, 8) and a.labels is None
    assert not torch.equal(load_source("strokes:count=40,seed=1").images, a.images)
    assert (a.images.flatten(1).max(1).values > 0.2).all() and (a.images.flatten(1).min(1).values < -0.9).all()
    assert a.images.min() >= -1 and a.images.max() <= 1


def test_folder_with_classes_and_resize(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    d = load_source(f"folder:{tmp_path}")
    assert len(d) == 6 and d.labels.tolist() == [0, 0, 0, 1, 1, 1] and d.ids[0] == "a/0.png"
    assert d.resized(8, 1).images.shape == (6, 1, 8, 8)
    assert d.resized(8, 3).images.shape == (6, 3, 8, 8)


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(DatawardError, match="holds no images"):
        load_source(f"folder:{tmp_path}")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatawardError, match="notes.txt is not an image"):
        load_source(f"folder:{tmp_path}")
    (tmp_path / "notes.txt").unlink()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatawardError, match="broken.png"):
        load_source(f"folder:{tmp_path}")
    with pytest.raises(DatawardError, match="does not exist"):
        load_source(f"folder:{tmp_path / 'missing'}")


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_round_trip_and_layouts(tmp_path):
    images = np.random.default_rng(0).uniform(0, 1, (5, 8, 8, 3)).astype(np.float32)
    d = load_source(_npz(tmp_path, images=images, labels=np.arange(5), ids=np.array([f"x{i}" for i in range(5)])))
    assert d.images.shape == (5, 3, 8, 8) and d.ids[0] == "x0" and d.labels.tolist() == list(range(5))
    assert np.allclose(d.images.permute(0, 2, 3, 1).numpy(), images * 2 - 1, atol=1e-6)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"labels": np.arange(3)}, "no 'images'"),
        ({"images": np.zeros((3, 2, 8, 8, 1))}, "must be"),
        ({"images": np.zeros((3, 8))}, "must be"),
        ({"images": np.array([[[np.nan] * 8] * 8] * 2)}, "NaN or inf"),
        ({"images": np.zeros((3, 8, 8)), "labels": np.arange(2)}, "one entry per image"),
        ({"images": np.zeros((3, 8, 8)), "ids": np.array(["a", "b", "a"])}, "duplicate sample ID 'a'"),
        ({"images": np.zeros((0, 8, 8))}, "empty"),
    ],
)
def test_npz_bad_input(tmp_path, arrays, message):
    with pytest.raises(DatawardError, match=message):
        load_source(_npz(tmp_path, **arrays))


def test_npz_never_unpickles(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, images=np.array([object()], dtype=object))
    with pytest.raises(DatawardError, match="without pickles"):
        load_source(f"npz:{path}")


def test_random_bytes_are_not_an_npz_not_a_pickle(tmp_path):
    path = tmp_path / "noise.npz"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(DatawardError, match="noise.npz: not an .npz file") as error:
        load_source(f"npz:{path}")
    assert "pickle" not in str(error.value)


def test_loose_images_beside_class_folders_are_refused_by_name(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "cat" / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "stray.png")
    with pytest.raises(DatawardError, match="1 image.* outside them .*stray.png"):
        load_source(f"folder:{tmp_path}")
    (tmp_path / "stray.png").unlink()
    (tmp_path / ".cache").mkdir()  # hidden folders are not classes
    assert load_source(f"folder:{tmp_path}").num_classes == 1


def test_nan_image_is_named(tmp_path):
    images = np.zeros((3, 8, 8), dtype=np.float32)
    images[1, 2, 2] = np.inf
    with pytest.raises(DatawardError, match="'b' contains NaN or inf"):
        load_source(_npz(tmp_path, images=images, ids=np.array(["a", "b", "c"])))


def test_unknown_source_and_options():
    with pytest.raises(DatawardError, match="unknown data source"):
        load_source("cifar10")
    with pytest.raises(DatawardError, match="unknown option"):
        load_source("digits:sbuset=3")
    with pytest.raises(DatawardError, match="between 1 and 1500"):
        load_source("digits:subset=0")


def test_ids_hash_is_order_free_and_select_names_unknown():
    assert ids_hash(["b", "a"]) == ids_hash(["a", "b"]) != ids_hash(["a"])
    d = Dataset(("a", "b"), torch.zeros(2, 1, 4, 4), None)
    with pytest.raises(DatawardError, match="unknown sample ID"):
        d.select(["c"])
