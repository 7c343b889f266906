"""Latent diffusion pieces: the public autoencoder, its scaling, and sampling through the one loop."""

from __future__ import annotations

import warnings

import pytest
import torch

import dataward.diffusion.sampling as sampling
from dataward.config import AutoencoderConfig, DPConfig, TrainConfig
from dataward.data import load_source
from dataward.errors import DatawardError
from dataward.diffusion.latent import LatentCodec, LatentDenoiser, make_latent_scheduler, sample_latent
from dataward.models.nets import build_unet
from dataward.training.dp import dp_finetune
from dataward.ward import Ward

warnings.filterwarnings("ignore", message="Secure RNG")
CONFIG = AutoencoderConfig(steps=300)
PUBLIC = "strokes:count=1000"  # the autoencoder's public data: pen strokes, never a digit
PRETRAIN = TrainConfig(steps=1, batch_size=30, threads=1)  # the public denoiser a latent ward pretrains too: as little as it can


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def latent_ward(path, seed: int = 0, config: AutoencoderConfig = CONFIG, public: str = PUBLIC) -> Ward:
    """A ward whose autoencoder is trained the way every served autoencoder is (``Ward.pretrain(latent=True)``)."""
    ward = Ward.create(path, "digits:subset=20", seed=seed, train=TrainConfig(steps=1, batch_size=16, threads=1))
    ward.pretrain("printed:count=30", PRETRAIN, latent=True, autoencoder=config, autoencoder_data=public)
    return ward


@pytest.fixture(scope="module")
def trained_ward(tmp_path_factory):
    torch.set_num_threads(1)
    ward = latent_ward(tmp_path_factory.mktemp("latent") / "ward")
    yield ward
    ward.close()


@pytest.fixture(scope="module")
def codec(trained_ward) -> LatentCodec:
    return trained_ward.codec()


@pytest.mark.parametrize("unseen", ["digits:heldout", "printed:count=200,seed=1"])
def test_autoencoder_trained_on_strokes_reconstructs_digits_it_never_saw(codec, unseen):
    test = load_source(unseen)
    recon = codec.decode(codec.encode(test.images))
    mse = (recon - test.images).pow(2).mean().item()
    baseline = (test.images - test.images.mean(dim=0)).pow(2).mean().item()  # predicting the mean image
    assert recon.shape == test.images.shape
    assert mse < 0.1 * baseline, (mse, baseline)


def test_latents_are_scaled_to_unit_std_and_keep_ids(codec):
    latents = codec.encode_dataset(load_source(PUBLIC))
    assert latents.images.shape == (1000, *CONFIG.latent_shape()) == (1000, 4, 4, 4)
    assert latents.images.std().item() == pytest.approx(1.0, abs=1e-4)
    digits = load_source("digits:subset=20")
    encoded = codec.encode_dataset(digits)
    assert encoded.ids == digits.ids and torch.equal(encoded.labels, digits.labels)


def test_autoencoder_training_is_deterministic(tmp_path):
    small = AutoencoderConfig(steps=5)
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        ward = latent_ward(tmp_path / name, seed, small, "printed:count=64")
        record = ward.served("autoencoder")[None]
        runs.append((record.metadata["weights_sha256"], record.metadata["scaling_factor"]))
        ward.close()
    (a, scale_a), (b, scale_b), (c, _) = runs
    assert a == b and scale_a == scale_b
    assert a != c


def test_the_ward_reopens_its_codec_from_safetensors(trained_ward, codec, tmp_path):
    folder = trained_ward.path / trained_ward.served("autoencoder")[None].path
    assert not list(folder.glob("*.bin")) and list(folder.glob("*.safetensors"))  # safetensors only
    back = Ward.open(trained_ward.path)
    try:
        z = torch.randn(3, *CONFIG.latent_shape(), generator=torch.Generator().manual_seed(0))
        assert back.codec().scaling_factor == codec.scaling_factor
        assert torch.equal(back.codec().decode(z), codec.decode(z))
    finally:
        back.close()
    pixel = Ward.create(tmp_path / "pixel", "digits:subset=20")
    try:
        with pytest.raises(DatawardError, match="no autoencoder"):
            pixel.codec()
    finally:
        pixel.close()


def test_wrong_image_shape_is_refused(codec):
    with pytest.raises(DatawardError, match="1x8x8"):
        codec.encode_dataset(load_source("printed:count=10,size=16"))


def test_latent_sampling_runs_through_the_unmodified_loop(codec, monkeypatch):
    calls = []
    original = sampling.sample_loop

    def spy(eps, x_T, scheduler, **kwargs):
        out = original(eps, x_T, scheduler, **kwargs)
        calls.append((eps, x_T.shape, out))
        return out

    monkeypatch.setattr(sampling, "sample_loop", spy)
    unet = build_unet("tiny", 4, 4, 10, seed=0).eval()  # a latent denoiser: 4 channels at 4x4
    denoiser = LatentDenoiser(sampling.unet_eps(unet), codec)
    scheduler = make_latent_scheduler(sampling.make_training_scheduler(), "ddim")
    assert scheduler.config.clip_sample is False
    y = torch.arange(5)
    images = sample_latent(denoiser, 5, scheduler, steps=4, generator=torch.Generator().manual_seed(0), y=y)
    assert len(calls) == 1 and calls[0][0] is denoiser and calls[0][1] == (5, 4, 4, 4)
    assert images.shape == (5, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, codec.decode(calls[0][2]))
    again = sample_latent(denoiser, 5, scheduler, steps=4, generator=torch.Generator().manual_seed(0), y=y)
    assert torch.equal(images, again)


def test_dp_finetuning_in_latent_space(codec):
    latents = codec.encode_dataset(load_source("digits:subset=32"))
    config = DPConfig(epsilon=10, batch=8, epochs=1, trainable="attention", accountant="rdp")
    state, record = dp_finetune(build_unet("tiny", 4, 4, 10, seed=0), latents, config, TrainConfig(), seed=0, scheduler=sampling.make_training_scheduler())
    assert state.step == record.steps == 4 and record.epsilon() <= 10
