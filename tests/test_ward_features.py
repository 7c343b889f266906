"""Guards and DP inside a ward: recorded in the ledger, retrained by forget, certified by verify, accounted in status."""

import json
from dataclasses import asdict

import pytest
import torch

from dataward.config import AutoencoderConfig, DPConfig, GuardConfig, TrainConfig
from dataward.errors import DatawardError

from conftest import make_ward

TINY_GUARD = GuardConfig(steps=4, batch_size=16)


def test_guards_per_compartment_are_forgotten_and_certified(tmp_path):
    ward = make_ward(tmp_path / "w", router=False, guard=True, guard_settings=TINY_GUARD)
    ward.train()
    guards = ward.served("guard")
    assert set(guards) == {0, 1}
    saw = ward.ledger.model_sample_ids(guards[0].id)
    assert saw == set(ward.training_data(0).ids) & saw and saw <= set(ward.training_data(0).ids)  # purity: its compartment only
    plain = ward.sample(4, seed=3, steps=8)
    guarded = ward.sample(4, seed=3, steps=8, guard=True, guard_scale=50.0, guard_alpha=0.49)
    assert not torch.equal(plain.images, guarded.images)
    assert 0.0 < guarded.guard_guided <= 1.0 and plain.guard_guided is None  # alpha 0.49: guides wherever p > 0.51
    strict = ward.sample(4, seed=3, steps=8, guard=True, guard_alpha=1e-9)  # a 4-step guard is never that confident
    assert strict.guard_guided == 0.0 and torch.equal(strict.images, plain.images)
    off = ward.sample(4, seed=3, steps=8, guard=False)
    assert torch.equal(plain.images, off.images)
    guard = ward.status().compartments[0]["guard"]
    protection = ward.status().compartments[0]["protection"]  # no audit yet; a 4-step guard is sure on no member
    assert protection.startswith("a guard that is never sure on its members at any t, so it protects nothing"), protection
    for figure in ("accuracy_by_t", "confident_members_by_t", "confident_public_by_t"):  # issue 17: false positives on public images
        assert list(guard[figure]) == ["0", "100", "200", "300", "400", "500"] and all(0.0 <= a <= 1.0 for a in guard[figure].values())
    assert guard["alpha"] == TINY_GUARD.alpha and guard["public_probe"] == f"{TINY_GUARD.nonmembers} (last 200)"
    victim = ward.training_data(1).ids[0]
    ward.forget([victim])
    assert ward.served("guard")[1].id != guards[1].id and ward.served("guard")[0].id == guards[0].id
    cert = ward.verify()
    assert cert.ok and {(m.kind, m.compartment) for m in cert.models} >= {("guard", 0), ("guard", 1)}


def test_dp_compartment_after_public_pretraining(tmp_path):
    ward = make_ward(tmp_path / "w", data="digits:subset=80", router=False)
    ward.train()
    ward.pretrain("printed:count=60", TrainConfig(steps=2, batch_size=30))
    assert ward.status().public_model["public"] is True
    before = ward.served()[0].id
    ward.enable_dp(DPConfig(epsilon=10.0, batch=20, epochs=1), compartments=[1])
    privacy = ward.status().privacy
    record = privacy["compartments"]["1"]
    assert record["epsilon"] <= 10.0 + 1e-9 and record["trainable"] == "attention"
    assert 0.05 < record["trainable_fraction"] < 0.15  # DP-LDM: ~90% fewer trainable parameters
    assert privacy["compartments"]["0"] == "not DP" and privacy["ward_epsilon"] == "inf"
    protection = [c["protection"] for c in ward.status().compartments]  # issue 22: what protects each compartment
    assert protection[0].startswith("neither DP nor a guard") and protection[1] == f"DP (ε = {record['epsilon']:.3f}, δ = {record['delta']:.2e})"
    assert ward.served()[0].id == before  # the non-DP compartment is untouched
    assert ward.serving_state()["1"] == "complete"  # one DP phase: its only stage is not a fallback
    assert ward.sample(2, steps=2, allowed=[1], weights="density", sampler="ddpm").models[1]["fallback"] is False
    json.dumps(asdict(ward.status()))  # status is valid JSON (no inf floats)
    ward.forget([ward.training_data(1).ids[0]])
    assert ward.verify().ok


def test_dp_bad_input_is_refused_before_training(tmp_path):
    ward = make_ward(tmp_path / "w", data="digits:subset=40", router=False)
    config_before = (ward.path / "ward.json").read_text()
    for bad, message in ((DPConfig(epsilon=0), "epsilon"), (DPConfig(clip=0), "clip"), (DPConfig(delta=0.5), "delta")):
        with pytest.raises(DatawardError, match=message):
            ward.enable_dp(bad)
    with pytest.raises(DatawardError, match="unknown compartment"):
        ward.enable_dp(DPConfig(), compartments=[5])
    assert (ward.path / "ward.json").read_text() == config_before and ward.ledger.models(any_compartment=True) == []


def test_a_library_caller_of_enable_dp_gets_the_refusal_the_cli_gives(tmp_path):
    """Issue 30: the one-DP-setting rule lived in the CLI, so Ward.enable_dp replaced a ward's DP setting silently."""
    ward = make_ward(tmp_path / "w", data="digits:subset=40", router=False)
    ward.reconfigure(dp=DPConfig(epsilon=10.0), dp_compartments=(1,))
    config_before = (ward.path / "ward.json").read_text()
    with pytest.raises(DatawardError, match=r"already DP-trains compartment\(s\) \[1\] at ε = 10; .*Pass --replace-dp"):
        ward.enable_dp(DPConfig(epsilon=1.0, batch=10, epochs=1), compartments=[0], train=False)
    assert (ward.path / "ward.json").read_text() == config_before  # nothing changed
    ward.enable_dp(DPConfig(epsilon=1.0, batch=10, epochs=1), compartments=[0], train=False, replace_dp=True)
    assert ward.config.dp.epsilon == 1.0 and ward.config.dp_compartments == (0,)


def test_a_wards_default_dp_trainable_set_is_its_adapters_under_lora():
    from dataward.config import WardConfig
    from dataward.training.privacy import default_trainable

    assert default_trainable(WardConfig(data="digits", adapter="lora:4")) == "lora"
    assert default_trainable(WardConfig(data="digits")) == "attention"


def test_latent_ward_trains_samples_forgets_and_certifies(tmp_path):
    from dataward.audit import audit_ward
    from dataward.config import AutoencoderConfig

    ward = make_ward(tmp_path / "w", data="digits:subset=80", guard=True, guard_settings=TINY_GUARD)
    ward.train()
    pixel = {c: r.id for c, r in ward.served().items()}
    ward.pretrain("printed:count=60", TrainConfig(steps=2, batch_size=30), latent=True, autoencoder=AutoencoderConfig(steps=3, batch_size=30),
                  autoencoder_data="strokes:count=40")
    autoencoder = ward.served("autoencoder")[None]
    assert autoencoder.public and autoencoder.metadata["num_ids"] == 40  # trained on the 40 public strokes only
    assert ward.model_shape() == (4, 4, 4) and ward.status().latent["autoencoder"]["id"] == autoencoder.id
    assert ward.models_missing() and ward.served() == {}  # the pixel models are no longer served: `train` retrains in latent space
    ward.train()
    served = ward.served()
    assert set(served) == {0, 1} and not set(pixel.values()) & {r.id for r in served.values()}
    unet = ward.model(served[0])
    assert (unet.config.in_channels, unet.config.sample_size) == (4, 4)  # the denoisers see 4x4x4 latents
    assert all(r.metadata["variant"].split("+")[0] == "latent-" + autoencoder.metadata["weights_sha256"][:16]
               for kind in ("denoiser", "guard", "router", "public-denoiser") for r in ward.served(kind).values())
    assert all(r.metadata["variant"].split("+")[1].startswith("calibrated-") for r in ward.served("guard").values())
    assert {r.status for r in ward.ledger.models("denoiser", 0, status=None)} == {"ready", "retired"}
    for options in ({"weights": "router"}, {"weights": "density", "sampler": "ddpm"}, {"guard": True}):
        result = ward.sample(3, seed=1, steps=4, **options)
        assert result.images.shape == (3, 1, 8, 8) and 0.0 <= result.images.min() and result.images.max() <= 1.0
    alone = ward.sample(3, seed=1, steps=4, allowed=[0])
    assert torch.equal(alone.images, ward.sample(3, seed=1, steps=4, allowed=[0]).images)
    assert ward.model_inputs(ward.training_data(0).images[:2]).shape == (2, 4, 4, 4)
    report = audit_ward(ward, n=20, steps=4, grid=0, members=10, timesteps=(50,), strict=True)
    assert {a["compartment"] for a in report["membership"]["attacks"]} == {0, 1}  # the attacks ran on latents
    rows = report["protection"]["compartments"]
    assert len(rows) == 2 and all(0.0 <= row[key] <= 1.0 for row in rows  # each compartment sampled alone, guarded and not
                                  for key in ("guard_steered_share", "unguarded_replication", "guarded_replication"))
    status = ward.status().compartments  # issue 17: status shows the audit's figures while they describe the served models
    assert [c["audited"]["unguarded_replication"] for c in status] == [row["unguarded_replication"] for row in rows]
    assert all("of its unguarded samples are copies" in c["protection"] for c in status)
    victim = ward.training_data(1).ids[0]
    ward.forget([victim])
    assert all(c["audited"] is None for c in ward.status().compartments)  # a model was retrained: those figures are stale
    assert ward.served("autoencoder")[None].id == autoencoder.id  # public: untouched by forgetting
    cert = ward.verify()
    assert cert.ok and {(m.kind, m.compartment) for m in cert.models} >= {("autoencoder", None), ("denoiser", 1), ("guard", 1)}
    ward.enable_dp(DPConfig(epsilon=10.0, batch=20, epochs=1), compartments=[1])  # DP-LDM: DP-SGD on the latents
    assert ward.served()[1].metadata["variant"].startswith("dp-") and ward.privacy()["compartments"]["1"]["epsilon"] <= 10.0 + 1e-9
    assert ward.sample(2, steps=2, allowed=[1], weights="density", sampler="ddpm").images.shape == (2, 1, 8, 8)


def test_latent_pretraining_refuses_a_preset_too_deep_for_the_latents(tmp_path):
    ward = make_ward(tmp_path / "w", data="digits:subset=40", model="base")  # base halves 3 times: 8 px ok, 4x4 latents not
    before = (ward.path / "ward.json").read_text()
    with pytest.raises(DatawardError, match="4x4x4 latents are too small for the 'base' preset"):
        ward.pretrain("printed:count=20", latent=True)
    assert (ward.path / "ward.json").read_text() == before and ward.ledger.models(any_compartment=True) == []


def test_a_library_caller_gets_the_autoencoder_refusals_the_command_line_gave(tmp_path):
    """Issue 30: `dataward pretrain` refused an autoencoder's settings without --latent and fewer than 1 autoencoder step,
    but Ward.pretrain took them (a pixel ward saved an autoencoder it never trains; 0 steps trained nothing)."""
    ward = make_ward(tmp_path / "w", data="digits:subset=40")
    before = (ward.path / "ward.json").read_text()
    for settings in (dict(autoencoder=AutoencoderConfig(steps=3)), dict(autoencoder_data="printed:count=20")):
        with pytest.raises(DatawardError, match="need --latent"):
            ward.pretrain("printed:count=20", **settings)
    with pytest.raises(DatawardError, match="steps .* must be at least 1, got 0"):
        AutoencoderConfig(steps=0)
    assert (ward.path / "ward.json").read_text() == before and ward.ledger.models(any_compartment=True) == []
