"""MNIST and Fashion-MNIST in the audit: the pinned 28x28 feature nets, the held-out test split of their wards, and the
DPImageBench classifier protocol. Tests that need the real packages skip, saying why, where the npm registry cannot be
reached (the ``real`` fixture)."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from dataward.audit import features as features_module
from dataward.audit.classifier import ClassifierConfig, classifier_accuracy, synthetic_accuracy, train_classifier
from dataward.audit.features import BENCHMARK_FEATURE_NETS, benchmark_feature_net
from dataward.audit.metrics import frechet_distance
from dataward.audit.choices import Skip, pick_features
from dataward.config import TrainConfig
from dataward.data import load_source
from dataward.errors import DatawardError
from dataward.ward import Ward


def run(*args) -> subprocess.CompletedProcess:
    """The CLI in a subprocess (this process's environment: the test's dataset cache), which must succeed."""
    proc = subprocess.run([sys.executable, "-c", "from dataward.app.cli import main; main()", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_the_pinned_feature_net_sorts_real_images_it_never_saw_and_its_fd_tells_real_from_noise(real, name):
    real(name, "test")
    net = benchmark_feature_net(name)
    stated = json.loads((features_module.WEIGHTS_DIR / f"{name}-cnn.json").read_text())
    assert net.heldout_accuracy == stated["heldout_accuracy"] > (0.95 if name == "mnist" else 0.88)
    assert BENCHMARK_FEATURE_NETS[name].train == f"{name}:split=test"  # never the training split, where wards take their data
    unseen, reference = load_source(f"{name}:subset=500"), load_source(f"{name}:split=test,subset=500")
    accuracy = float((net.predict(unseen.images) == unseen.labels).float().mean())
    assert accuracy > net.heldout_accuracy - 0.05  # 500 of the training split: as good as stated on all of it
    blurred = torch.nn.functional.avg_pool2d(unseen.images, 3, stride=1, padding=1, count_include_pad=False)
    real_fd, blurred_fd = frechet_distance(net(unseen.images), net(reference.images)), frechet_distance(net(blurred), net(reference.images))
    assert blurred_fd > 3 * real_fd
    assert net.info()["name"] == f"{name}-cnn" and net.copy_features(unseen.images[:3]).shape == (3, 64 * 7 * 7)


def test_a_feature_net_file_that_is_not_the_pinned_one_is_refused_by_name(monkeypatch, tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(features_module.WEIGHTS_DIR, folder)
    monkeypatch.setattr(features_module, "WEIGHTS_DIR", folder)
    assert benchmark_feature_net("mnist").heldout_accuracy > 0.95  # the copy loads
    weights = folder / "mnist-cnn.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(DatawardError, match=r"mnist-cnn.safetensors has sha256 [0-9a-f]{64}, not the pinned .*benchmarks/feature_nets.py --write mnist"):
        benchmark_feature_net("mnist")
    with pytest.raises(DatawardError, match="no pinned feature net for 'digits'"):
        benchmark_feature_net("digits")


def test_a_fashion_ward_is_audited_by_its_pinned_net_against_the_fixed_test_split(real, tmp_path):
    real("fashion-mnist", "test")
    ward = Ward.create(tmp_path / "w", "fashion-mnist:classes=3+8,subset=20", image_size=28, train=TrainConfig(steps=1))
    heldout = ward.heldout_data()
    assert len(heldout) == 2000 and set(heldout.labels.tolist()) == {3, 8}  # the test split of the ward's classes
    assert heldout.ids == load_source("fashion-mnist:split=test,classes=3+8").ids and not set(heldout.ids) & set(ward.training_data().ids)
    assert pick_features(str(ward.config.data), heldout, None, None).info["name"] == "fashion-mnist-cnn"
    ward.close()
    on_test = Ward.create(tmp_path / "t", "fashion-mnist:split=test,subset=20", image_size=28, train=TrainConfig(steps=1))
    assert on_test.heldout_data() is None
    with pytest.raises(Skip, match="trained on fashion-mnist's test split, which this ward holds"):
        pick_features(str(on_test.config.data), None, None, None)
    on_test.close()


def test_the_classifier_protocol_learns_labels_deterministically_and_fails_on_wrong_labels(real):
    real("mnist", "test")
    train, test = load_source("mnist:subset=600"), load_source("mnist:split=test")
    config = replace(ClassifierConfig(), epochs=15)
    state = torch.random.get_rng_state()
    first = train_classifier(train.images, train.labels, config)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left as it was
    second = train_classifier(train.images, train.labels, config)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert classifier_accuracy(first, test.images, test.labels) > 0.85  # 600 real digits; the full training split: see BENCHMARKS
    wrong = train.labels[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
    assert synthetic_accuracy(train.images, wrong, test.images, test.labels, config) < 0.3
    with pytest.raises(DatawardError, match="at least two classes"):
        synthetic_accuracy(train.images, torch.zeros_like(train.labels), test.images, test.labels, config)


def test_init_picks_the_measured_latent_ward_for_the_benchmark_sets_and_keeps_what_the_user_names(real, tmp_path):
    from dataward.config import WardConfig
    from dataward.defaults import REAL_AUTOENCODER, init_defaults

    real("fashion-mnist", "test")
    assert init_defaults("digits:subset=60") == init_defaults("folder:x") and init_defaults("digits").image_size == 8
    assert init_defaults("mnist").config_changes["public"] == "printed:count=3000,size=32"  # never MNIST itself
    chosen = run("init", tmp_path / "f", "--data", "fashion-mnist:subset=20")
    assert "chosen for fashion-mnist:subset=20: latent ward" in chosen.stdout
    config = WardConfig.load(tmp_path / "f")
    assert (config.image_size, config.model, config.train.epochs, config.latent) == (32, "tiny", 30.0, True)
    assert (config.autoencoder, config.autoencoder_data, config.public, config.base) == (REAL_AUTOENCODER, "mnist", "mnist", "public")
    assert config.model_shape() == (4, 8, 8)
    run("init", tmp_path / "p", "--data", "fashion-mnist:subset=20", "--image-size", "28")
    pixel = WardConfig.load(tmp_path / "p")
    assert (pixel.image_size, pixel.latent, pixel.public, pixel.train.epochs) == (28, False, None, 200.0)
