"""Shared fixtures: tiny wards trained once per session (quality is irrelevant; exactness is what is tested)."""

import shutil

import pytest
import torch

from dataward.training.loop import TrainConfig
from dataward.ward import Ward

TINY = TrainConfig(steps=4, batch_size=16)
TINY_ROUTER = TrainConfig(steps=2, batch_size=16)


def make_ward(path, data="digits:subset=60", **kwargs):
    """A small ward with a tiny training budget."""
    options = dict(compartments=2, slices=2, train=TINY, router_train=TINY_ROUTER)
    options.update(kwargs)
    return Ward.create(path, data, **options)


@pytest.fixture(scope="session")
def trained_ward_dir(tmp_path_factory):
    """A trained K=3, R=2 ward with a router; copy it before changing it."""
    torch.set_num_threads(2)
    path = tmp_path_factory.mktemp("wards") / "base"
    ward = make_ward(path, compartments=3)
    ward.train()
    ward.close()
    return path


@pytest.fixture
def ward_copy(trained_ward_dir, tmp_path):
    """A private copy of the trained ward."""
    path = tmp_path / "ward"
    shutil.copytree(trained_ward_dir, path)
    ward = Ward.open(path)
    yield ward
    ward.close()
