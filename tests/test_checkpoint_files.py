"""Every file a model or a resume reads is checked against the hashes the ledger recorded (issue 35, item 8): a
training state copied from another compartment is not resumed from, an edited config.json is refused by name, and
non-finite outputs never become an answer (NaN is not JSON)."""

import json
import shutil

import pytest
import torch

from dataward.errors import DatawardError
from dataward.store.checkpoints import STATE_FILE
from dataward.ward import Ward


def _stage(ward, compartment, stage):
    return next(r for r in ward.ledger.models("denoiser", compartment) if r.stage == stage)


def test_a_training_state_copied_from_another_compartment_is_not_resumed_from(ward_copy):
    lineage = next(l for l in ward_copy.lineages() if l.kind == "denoiser" and l.compartment == 0)
    victim = sorted(set(lineage.stage_ids[1]) - set(lineage.stage_ids[0]))[0]  # in slice 1: retraining resumes from stage 0
    shutil.copyfile(ward_copy.path / _stage(ward_copy, 1, 0).path / STATE_FILE, ward_copy.path / _stage(ward_copy, 0, 0).path / STATE_FILE)
    with pytest.warns(UserWarning, match=f"not resuming from stage 0 of the denoiser of compartment 0: .*{STATE_FILE} is not the file written"):
        ward_copy.forget([victim])
    assert not ward_copy.models_missing()
    certificate = ward_copy.verify(compartments=[0])
    denoiser = [m for m in certificate.models if m.kind == "denoiser" and m.compartment == 0]
    assert denoiser and all(m.equal for m in denoiser)


def test_an_edited_config_json_is_refused_by_name(ward_copy):
    config_path = ward_copy.path / ward_copy.served()[0].path / "config.json"
    config = json.loads(config_path.read_text())
    config["norm_eps"] = config["norm_eps"] * 100  # loads fine, changes every image
    config_path.write_text(json.dumps(config))
    reopened = Ward.open(ward_copy.path)
    with pytest.raises(DatawardError, match=r"config\.json is not the file written when this model was trained"):
        reopened.sample(2, steps=2, allowed=[0])
    assert reopened.sample(2, steps=2, allowed=[1]).images.isfinite().all()
    reopened.close()


def test_non_finite_outputs_are_refused_not_returned(ward_copy):
    model = ward_copy.model(ward_copy.served()[0])  # the cached model a sample uses
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(DatawardError, match=r"compartment\(s\) \[0\] produced non-finite values"):
        ward_copy.sample(2, steps=2, allowed=[0])
