"""Model files are checked against the ledger's hash before they are used (issue 19, defect 4)."""

import shutil

import pytest

from dataward.errors import DatawardError
from dataward.store.checkpoints import WEIGHTS_FILE
from dataward.ward import Ward


def _weights(ward, compartment):
    return ward.path / ward.served()[compartment].path / WEIGHTS_FILE


def test_flipped_weight_bytes_are_refused_by_name(ward_copy):
    path = _weights(ward_copy, 0)
    data = bytearray(path.read_bytes())
    data[-4:] = bytes(b ^ 0x40 for b in data[-4:])  # one float of the last tensor: still a valid safetensors file
    path.write_bytes(bytes(data))
    reopened = Ward.open(ward_copy.path)
    with pytest.raises(DatawardError, match="refusing to load the denoiser of compartment 0 .*the file was changed or replaced"):
        reopened.sample(2, steps=2, allowed=[0])
    assert reopened.sample(2, steps=2, allowed=[1]).images.isfinite().all()  # the intact compartments still serve


def test_another_compartments_weights_copied_in_are_refused(ward_copy):
    shutil.copyfile(_weights(ward_copy, 1), _weights(ward_copy, 0))
    with pytest.raises(DatawardError, match="refusing to load the denoiser of compartment 0"):
        Ward.open(ward_copy.path).sample(2, steps=2, allowed=[0])


def test_a_truncated_weights_file_is_a_clear_error(ward_copy):
    path = _weights(ward_copy, 2)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatawardError, match="cannot load model denoiser from"):
        Ward.open(ward_copy.path).sample(2, steps=2, allowed=[2])
