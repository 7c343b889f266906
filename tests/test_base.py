"""A ward's base (issue 16): imported or public, compartments fine-tuned from it (full or LoRA), soups, exact forgetting."""

import pytest
import torch
from conftest import TINY, make_ward, save_unet
from safetensors.torch import load_file, save_file

from dataward.public_base import choose_base
from dataward.config import DPConfig, TrainConfig
from dataward.errors import DatawardError
from dataward.models.adapters import add_lora, is_adapter_name
from dataward.models.nets import build_unet
from dataward.store.checkpoints import ADAPTER_FILE, WEIGHTS_FILE, checkpoint_hash
from dataward.training.dp import make_private
from dataward.training.loop import TrainState
from dataward.training.privacy import trainable_filter
from dataward.ward import Ward


def test_auto_base_is_printed_digits_for_digits_wards_only():
    assert choose_base("auto", "digits:subset=60") == "printed:count=3000"
    assert choose_base("auto", "folder:/data/scans") is None
    assert choose_base("none", "digits") is None
    assert choose_base("printed:count=500", "folder:/x") == "printed:count=500"


def test_an_imported_base_is_where_every_compartment_starts(tmp_path):
    base_dir = save_unet(tmp_path / "unet")
    ward = make_ward(tmp_path / "w", base=str(base_dir))
    base = ward.served("public-denoiser")[None]
    assert base.metadata["imported_from"] == str(base_dir.resolve()) and base.metadata["parameters"] > 0
    ward.train()
    served = ward.served()
    assert all(r.metadata["base_sha256"] == base.metadata["weights_sha256"] for r in served.values())
    # after 4 Adam steps from the base (each weight moves ~lr a step), a compartment is still close to the base
    base_model, tuned = ward.model(base), ward.model(served[0])
    fresh = build_unet("tiny", 8, 1, 10, seed=123)
    drift = sum((a - b).abs().sum() for a, b in zip(tuned.parameters(), base_model.parameters()))
    distance = sum((a - b).abs().sum() for a, b in zip(fresh.parameters(), base_model.parameters()))
    assert 0 < drift < 0.25 * distance  # (a compartment trained from fresh weights would be as far as `distance`)


@pytest.mark.parametrize("changes, message", [
    (dict(image_size=16), "sample_size is 16, this ward needs 8"),
    (dict(num_classes=5), "num_class_embeds is 5, this ward needs 10"),
    (dict(channels=3), "in_channels is 3, this ward needs 1"),
])
def test_a_base_that_does_not_fit_is_refused_by_name(tmp_path, changes, message):
    base_dir = save_unet(tmp_path / "unet", **changes)
    with pytest.raises(DatawardError, match=message):
        make_ward(tmp_path / "w", base=str(base_dir))
    assert not (tmp_path / "w").exists()


def test_a_folder_without_safetensors_weights_is_refused(tmp_path):
    base_dir = save_unet(tmp_path / "unet")
    (base_dir / WEIGHTS_FILE).rename(base_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(DatawardError, match="not a diffusers UNet2DModel folder"):
        make_ward(tmp_path / "w", base=str(base_dir))


def test_forgetting_from_a_base_is_exact_and_never_touches_the_base(base_ward_dir, tmp_path):
    import shutil

    shutil.copytree(base_ward_dir, tmp_path / "w")
    ward = Ward.open(tmp_path / "w")
    base = ward.served("public-denoiser")[None]
    base_bytes = checkpoint_hash(ward.path / base.path)
    victim = ward.training_data(1).ids[0]
    ward.forget([victim])
    assert ward.served("public-denoiser")[None].id == base.id
    assert checkpoint_hash(ward.path / base.path) == base_bytes == base.metadata["weights_sha256"]
    certificate = ward.verify()
    assert certificate.ok and {c.kind for c in certificate.models} == {"denoiser"}  # the base is not retrained


@pytest.mark.parametrize("weights", ["density", "soup"])
def test_access_is_exact_when_another_compartment_is_added_or_garbage(base_ward_dir, tmp_path, weights):
    import shutil

    shutil.copytree(base_ward_dir, tmp_path / "w")
    ward = Ward.open(tmp_path / "w")
    sampler = "ddpm" if weights == "density" else "ddim"
    before = ward.sample(6, seed=3, steps=4, allowed=[0, 1], weights=weights, sampler=sampler)
    ward.add("digits:subset=20", train=True)
    garbage = ward.path / ward.served()[2].path / WEIGHTS_FILE
    save_file({k: torch.randn_like(v) for k, v in load_file(str(garbage)).items()}, str(garbage))
    ward.close()
    ward = Ward.open(tmp_path / "w")
    after = ward.sample(6, seed=3, steps=4, allowed=[0, 1], weights=weights, sampler=sampler)
    assert torch.equal(before.images, after.images) and after.weights == weights
    with pytest.raises(DatawardError, match="refusing to load"):
        ward.sample(2, steps=2, allowed=[2])


def test_a_soup_is_the_data_share_weighted_average_and_is_cached(base_ward_dir):
    ward = Ward.open(base_ward_dir, worker=True)
    served, counts = ward.served(), ward.ledger.counts()
    records = [served[0], served[1]]
    shares = [float(counts[c]["samples"]) for c in (0, 1)]
    soup = ward.soup(records, shares)
    assert ward.soup(records, shares) is soup
    name = "conv_in.weight"
    a, b = (dict(ward.model(r).named_parameters())[name] for r in records)
    expected = (shares[0] * a + shares[1] * b) / sum(shares)
    assert torch.allclose(dict(soup.named_parameters())[name], expected, atol=1e-6)
    assert not torch.allclose(a, b)  # the two compartments did move apart: the average is a real test
    result = ward.sample(4, seed=0, steps=3, weights="soup")
    rows = result.attribution.sum(dim=1)
    assert torch.allclose(rows, torch.ones(4)) and result.weights == "soup"
    with pytest.raises(DatawardError, match="guards steer"):
        ward.sample(2, steps=2, weights="soup", guard=True)


def test_soup_is_refused_without_a_base(ward_copy):
    with pytest.raises(DatawardError, match="has none"):
        ward_copy.sample(2, steps=2, weights="soup")


def test_lora_compartments_train_and_store_only_their_adapter(tmp_path):
    ward = make_ward(tmp_path / "w", router=False, base=str(save_unet(tmp_path / "unet")), adapter="lora:4",
                     train=TrainConfig(steps=6, batch_size=16, lr=1e-2))
    ward.train()
    base = ward.model(ward.served("public-denoiser")[None])
    for record in ward.served().values():
        folder = ward.path / record.path
        assert (folder / ADAPTER_FILE).is_file() and not (folder / WEIGHTS_FILE).exists()
        names = set(load_file(str(folder / ADAPTER_FILE)))
        assert names and all(is_adapter_name(n) for n in names) and any("lora_B" in n for n in names)
        merged = ward.model(record)
        moved = {n for (n, p), q in zip(merged.named_parameters(), base.parameters()) if not torch.equal(p, q)}
        # LoRA moves the wrapped layers' weights (and the class embedding); norms and biases stay the base's
        assert moved and all(n.endswith(".weight") for n in moved)
        assert not any("norm" in n for n in moved)
    assert ward.sample(4, seed=0, steps=3).images.isfinite().all()
    assert ward.verify().ok


def test_lora_ward_size_is_a_fraction_of_full(tmp_path):
    """An adapter checkpoint (adapter + its training state) is far smaller than a full fine-tune's."""
    sizes = {}
    for adapter in ("full", "lora:4"):
        ward = make_ward(tmp_path / adapter.replace(":", ""), compartments=1, slices=1, router=False,
                         base=str(save_unet(tmp_path / f"unet-{adapter.replace(':', '')}")), adapter=adapter, train=TINY)
        ward.train()
        sizes[adapter] = ward.status().compartments[0]["model"]["bytes"]
    assert sizes["lora:4"] < 0.3 * sizes["full"]


def test_dp_per_sample_gradients_of_adapter_parameters_match_single_sample_backward():
    from test_privacy import _digits, _fixed_batch, _loss, _mismatches, _reference_grads

    def lora_model():
        model = add_lora(build_unet("tiny", 8, 1, 10, seed=0), rank=4, seed=1)
        with torch.no_grad():  # B starts at zero, which would leave A without gradient: make both matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
        return model

    batch = _fixed_batch()
    reference = _reference_grads("lora", batch, lora_model())
    model = lora_model()
    state = TrainState.fresh(model, TrainConfig(), trainable_filter("lora"))
    private = make_private(state, _digits(16), DPConfig(epsilon=10, batch=4, epochs=1, trainable="lora", accountant="rdp"), seed=0)
    try:
        _loss(private.module, *batch).mean().backward()
        got = {n: getattr(p, "grad_sample", None) for n, p in model.named_parameters() if p.requires_grad}
    finally:
        private.close()
    assert set(got) == set(reference) and any("lora_A" in n for n in got) and any("class_embedding" in n for n in got)
    assert _mismatches(got, reference) == []
