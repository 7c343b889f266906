"""diffusers where users already work (issue 20): WardPipeline equals Ward.sample bit for bit and never uses a forgotten
ID's model; an export is a stock DDPMPipeline folder holding the soup, with a manifest, marked stale by a forget."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler

from dataward.errors import DatawardError
from dataward.sampling.export import MANIFEST, UNET_FILE, export_states, export_ward
from dataward.sampling.pipeline import WardPipeline
from dataward.store.checkpoints import weights_hash
from dataward.ward import Ward


@pytest.mark.parametrize("weights,allowed", [("density", None), ("soup", [0, 2]), ("density", [1])])
def test_the_pipeline_equals_ward_sample_bit_for_bit(base_ward, weights, allowed):
    pipe = WardPipeline.from_ward(base_ward.path, allowed=allowed, weights=weights)
    out = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(11), output_type="pt")
    ref = base_ward.sample(3, seed=11, steps=4, allowed=allowed, weights=weights)
    assert torch.equal(out.images, ref.images)
    assert np.array_equal(out.attribution, ref.attribution.numpy()) and out.models == ref.models
    as_np = pipe(batch_size=3, num_inference_steps=4, generator=torch.Generator().manual_seed(11), output_type="np").images
    assert as_np.shape == (3, 8, 8, 1) and np.array_equal(as_np, ref.images.permute(0, 2, 3, 1).numpy())


def test_the_pipeline_takes_per_sample_labels_and_other_schedulers(base_ward):
    config = base_ward.scheduler.config
    pipe = WardPipeline(base_ward, weights="soup", scheduler=DPMSolverMultistepScheduler.from_config(config))
    out = pipe(batch_size=2, class_labels=[3, 7], num_inference_steps=6, output_type="pil")
    assert [im.size for im in out.images] == [(8, 8), (8, 8)] and out.labels.tolist() == [3, 7]
    with pytest.raises(DatawardError, match="density weights need DDPM steps"):
        WardPipeline(base_ward, weights="density", scheduler=DPMSolverMultistepScheduler.from_config(config))(num_inference_steps=2)
    with pytest.raises(DatawardError, match="another noise schedule"):
        WardPipeline(base_ward, scheduler=DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_end=0.05))(num_inference_steps=2)
    with pytest.raises(DatawardError, match="2 class labels for 3 samples"):
        pipe(batch_size=3, class_labels=[1, 2], num_inference_steps=2)


# the schedulers the README names (any ε-prediction scheduler of diffusers should do; these are the ones tested)
README_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
                     "DEISMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                     "KDPM2DiscreteScheduler", "LMSDiscreteScheduler", "PNDMScheduler")


def _scheduler(name, config, **changes):
    import diffusers

    return getattr(diffusers, name).from_config(config, **changes)


def _gaussian_eps_with_an_error(m, v, alphas_cumprod, error):
    """The exact ε of data N(m, v I) plus a fixed ``error``, as a trained model has one: the error is what the schedule's
    last step (ᾱ ≈ 2.4e-9 at t = T − 1) turns into an x_0 error of ~20,000 x."""
    from dataward.sampling.pipeline import alpha_bar_at

    def eps(x_t, t, y):
        a = alpha_bar_at(alphas_cumprod, t)
        return (1 - a) ** 0.5 * (x_t - a ** 0.5 * m) / (a * v + 1 - a) + error

    return eps


@pytest.mark.parametrize("name", README_SCHEDULERS)
def test_every_scheduler_the_readme_names_samples_the_data_with_a_slightly_wrong_eps(name):
    """Issue 36: `DPMSolverMultistepScheduler.from_config(ward.scheduler.config)` gave saturated noise. With a closed-form
    ε that is off by 0.02 (a model's error), each scheduler, run the way WardPipeline runs it, ends at the data N(m, 0.1²)."""
    from dataward.diffusion.sampling import make_training_scheduler
    from dataward.sampling.pipeline import ClippedEps, clips_x0, scheduler_loop

    config = make_training_scheduler().config
    alphas_cumprod = make_training_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    m = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    eps = _gaussian_eps_with_an_error(m, 0.01, alphas_cumprod, 0.02 * torch.randn(1, 1, 4, 4, generator=g))
    x_T = torch.randn(256, 1, 4, 4, generator=g)
    scheduler = _scheduler(name, config)
    wrapped = eps if clips_x0(scheduler) else ClippedEps(eps, alphas_cumprod)
    for steps in (20, 50):
        x = scheduler_loop(wrapped, x_T, scheduler, steps, generator=torch.Generator().manual_seed(1))
        assert (x.mean(0) - m[0]).abs().max() < 0.05 and 0.05 < x.std(0).mean() < 0.2, (steps, x.mean(0) - m[0], x.std(0).mean())
    if name == "DPMSolverMultistepScheduler":  # the cause: its own linspace spacing, and no x_0 clipping
        broken = scheduler_loop(eps, x_T, _scheduler(name, config, timestep_spacing="linspace"), 20)
        assert (broken.mean(0) - m[0]).abs().max() > 1


@pytest.mark.parametrize("name", README_SCHEDULERS)
def test_every_scheduler_the_readme_names_samples_latents_with_a_slightly_wrong_eps(name):
    """Issue 36: the schedulers were checked on pixel wards only. A latent ward's pipeline hands its scheduler config
    (no x_0 clipping: latents are unbounded) and bounds x_0 at ±LATENT_X0_BOUND for schedulers that do not: each one, run
    that way on data N(m, 0.1²) with m beyond [-1, 1] (unit-std latents), ends at the data (the ward's own DDIM: within 0.05)
    (DPM-Solver singlestep starts at t = 999 and, unbounded, ended ~7 off)."""
    from dataward.diffusion.latent import make_latent_scheduler
    from dataward.diffusion.sampling import make_training_scheduler
    from dataward.sampling.pipeline import LATENT_X0_BOUND, ClippedEps, clips_x0, scheduler_loop

    training = make_training_scheduler()
    config = make_latent_scheduler(training, "ddim").config  # what `pipe.scheduler.config` is in a latent ward
    g = torch.Generator().manual_seed(0)
    m = torch.linspace(-2, 2, 64).reshape(1, 4, 4, 4)
    eps = _gaussian_eps_with_an_error(m, 0.01, training.alphas_cumprod, 0.02 * torch.randn(1, 4, 4, 4, generator=g))
    x_T = torch.randn(256, 4, 4, 4, generator=g)
    own = scheduler_loop(eps, x_T, make_latent_scheduler(training, "ddim"), 20)
    scheduler = _scheduler(name, config)
    wrapped = eps if clips_x0(scheduler) else ClippedEps(eps, training.alphas_cumprod, LATENT_X0_BOUND)
    for steps in (20, 50):
        x = scheduler_loop(wrapped, x_T, scheduler, steps, generator=torch.Generator().manual_seed(1))
        error, own_error = (x.mean(0) - m[0]).abs().max(), (own.mean(0) - m[0]).abs().max()
        assert error < 0.1 and 0.05 < x.std(0).mean() < 0.2, (steps, error, own_error, x.std(0).mean())  # unbounded: 3.4-6.9


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "DDPMScheduler"])
def test_a_scheduler_swap_on_a_ward_samples_like_the_wards_own_scheduler(base_ward, name):
    """Issue 36: `pipe.scheduler` shows the ward's own sampler (it was None), and the README's swap draws images as the
    default does: on this briefly trained ward the default's samples are rarely saturated (< 0.1%), the broken swap's
    were all (100% of pixels at 0 or 1)."""
    from diffusers import DDIMScheduler

    pipe = WardPipeline(base_ward, weights="soup")
    assert isinstance(pipe.scheduler, DDIMScheduler) and isinstance(WardPipeline(base_ward).scheduler, DDPMScheduler)
    seed = torch.Generator().manual_seed
    default = pipe(batch_size=32, num_inference_steps=20, generator=seed(0), output_type="pt").images
    assert torch.equal(default, base_ward.sample(32, seed=0, steps=20, weights="soup").images)  # the ward's own, untouched
    pipe.scheduler = _scheduler(name, pipe.scheduler.config)
    swapped = pipe(batch_size=32, num_inference_steps=20, generator=seed(0), output_type="pt").images

    def saturated(images):
        return ((images < 0.01) | (images > 0.99)).float().mean().item()

    assert saturated(default) < 0.001 and saturated(swapped) < 0.5
    assert (swapped.mean() - default.mean()).abs() < 0.15


def test_a_pipeline_made_before_a_forget_never_uses_the_forgotten_ids_model(base_ward):
    pipe = WardPipeline.from_ward(base_ward.path, allowed=[0])
    before = pipe(batch_size=1, num_inference_steps=2, output_type="pt").models[0]["model"]
    victim = base_ward.training_data(0).ids[0]
    base_ward.accept_forget([victim])
    assert base_ward.ledger.tainted_models([before]) == [before]
    after = [m["model"] for m in pipe(batch_size=1, num_inference_steps=2, output_type="pt").models.values()]
    assert after and before not in after and base_ward.ledger.tainted_models(after) == []


def test_an_export_is_a_stock_ddpm_pipeline_holding_the_soup(base_ward, tmp_path):
    manifest = export_ward(base_ward.read(), tmp_path / "acme", allowed=[0, 2], label=4)
    stock = DDPMPipeline.from_pretrained(tmp_path / "acme", use_safetensors=True)
    images = stock(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert not list((tmp_path / "acme").rglob("*.bin")) and not (tmp_path / "acme" / "writer.lock").exists()  # safetensors only, no lock file
    # the exported model is the soup at class 4 (class embedding folded into the time embedding)
    served, counts = base_ward.served(), base_ward.ledger.counts()
    soup = base_ward.soup([served[0], served[2]], [counts[0]["samples"], counts[2]["samples"]])
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 500])
    with torch.no_grad():
        assert torch.allclose(stock.unet(x, t).sample, soup(x, t, class_labels=torch.tensor([4, 4])).sample, atol=1e-5)
    on_disk = json.loads((tmp_path / "acme" / MANIFEST).read_text())
    # issue 36: nothing about the server's file system leaves in an export; the ledger keeps where it went
    for file in (tmp_path / "acme").rglob("*.json"):
        text = file.read_text()
        assert str(base_ward.path.resolve()) not in text and str(tmp_path) not in text and str(base_ward.path) not in text, file
    assert "ward" not in on_disk and "folder" not in on_disk
    [event] = base_ward.ledger.events_of("export")
    assert event["detail"]["folder"] == str((tmp_path / "acme").resolve()) and event["detail"]["ward"] == str(base_ward.path.resolve())
    assert on_disk["unet_sha256"] == weights_hash(tmp_path / "acme" / UNET_FILE) == manifest["unet_sha256"]
    assert [c["weights_sha256"] for c in on_disk["compartments"]] == [served[0].metadata["weights_sha256"], served[2].metadata["weights_sha256"]]
    assert sum(c["share"] for c in on_disk["compartments"]) == pytest.approx(1.0)
    # a forget in compartment 2 makes the export stale; one in compartment 1 does not
    assert export_states(base_ward.ledger)[0]["stale"] is False
    base_ward.accept_forget([base_ward.training_data(1).ids[0]])
    assert export_states(base_ward.ledger)[0]["stale"] is False
    base_ward.accept_forget([base_ward.training_data(2).ids[0]])
    [state] = export_states(base_ward.ledger)
    assert state["stale"] and state["changed_compartments"] == [2]


def test_exports_that_cannot_hold_their_promise_are_refused(base_ward, ward_copy, tmp_path):
    with pytest.raises(DatawardError, match="class-conditional .*--label"):
        export_ward(base_ward.read(), tmp_path / "a", allowed=[0])
    with pytest.raises(DatawardError, match="soup needs compartments fine-tuned from one base"):
        export_ward(ward_copy.read(), tmp_path / "b", allowed=[0], label=1)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    with pytest.raises(DatawardError, match="not an empty folder"):
        export_ward(base_ward.read(), tmp_path / "full", allowed=[0], label=1)
    assert (tmp_path / "full" / "x").read_text() == "mine" and not (tmp_path / "a").exists()


def test_export_and_a_forget_that_makes_it_stale_from_the_command_line(base_ward, tmp_path):
    from test_cli import run

    path = base_ward.path
    victim = base_ward.training_data(1).ids[0]
    base_ward.close()
    shown = run("export", path, "--allow", "0,1", "--out", tmp_path / "acme", "--label", "2").stdout
    assert "exported compartments [0, 1]" in shown and "DDPMPipeline.from_pretrained" in shown
    assert (tmp_path / "acme" / MANIFEST).is_file()
    forgot = run("forget", path, victim).stdout
    assert "exports now stale" in forgot and str((tmp_path / "acme").resolve()) in forgot.replace("\n", "")
    ward = Ward.open(path, worker=True)
    try:
        [export] = ward.status().exports
        assert export["stale"] and export["changed_compartments"] == [1]
    finally:
        ward.close()


def test_a_folder_of_32px_rgb_images_goes_through_the_whole_life(tmp_path):
    """init -> train (small preset) -> sample -> forget -> verify -> audit with the user's own feature network."""
    from dataward.audit import audit_ward
    from dataward.config import TrainConfig
    from dataward.data import load_source
    from dataward.shapes import write_shapes_folder

    folder = write_shapes_folder(tmp_path / "shapes", 36, seed=0, size=32)
    ward = Ward.create(tmp_path / "w", f"folder:{folder}", compartments=2, slices=2, model="small", image_size=32, router=False,
                       train=TrainConfig(steps=2, batch_size=4))
    try:
        assert (ward.config.channels, ward.config.num_classes, ward.config.base) == (3, 3, None)
        ward.train()
        images = ward.sample(2, steps=2).images
        assert images.shape == (2, 3, 32, 32) and images.isfinite().all()
        victim = ward.training_data(1).ids[0]
        assert victim.startswith("square/") or victim.startswith("circle/") or victim.startswith("triangle/")
        ward.forget([victim])
        assert victim not in ward.training_data(1).ids and ward.verify().ok
        torch.manual_seed(0)
        features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
        report = audit_ward(ward, n=4, steps=2, grid=4, members=4, timesteps=(10,), features=features,
                            heldout=load_source("shapes:count=12,seed=1"))
        assert report["quality"]["status"] == "ok" and np.isfinite(report["quality"]["fd"]) and report["quality"]["fd"] > 0
    finally:
        ward.close()


def test_the_audit_lists_exports_and_which_are_stale(base_ward, tmp_path):
    from dataward.audit.report import render_html
    from dataward.audit.sections import ward_summary

    export_ward(base_ward.read(), tmp_path / "acme", allowed=[1], label=0)
    base_ward.accept_forget([base_ward.training_data(1).ids[0]])
    summary = ward_summary(base_ward, base_ward.compartments(), base_ward.training_data(), None)
    assert [(e["compartments"], e["stale"]) for e in summary["exports"]] == [([1], True)]
    page = render_html({"ward": summary, "settings": {"n": 0}, "timings": {}}, {})
    assert "1 export(s) (<b class='bad'>1 stale</b>" in page and str((tmp_path / "acme").resolve()) in page


def test_a_forget_landing_mid_call_discards_the_calls_images(base_ward):
    """Issue 35 item 6: a call whose model was quarantined by a forget while it sampled returned those images silently."""
    pipe = WardPipeline(base_ward, allowed=[0, 1], weights="density")
    victim = base_ward.training_data(1).ids[0]
    steps = pipe.progress_bar

    def forget_after_the_first_step(timesteps):
        for i, t in enumerate(steps(timesteps)):
            if i == 1:
                base_ward.accept_forget([victim])
            yield t

    pipe.progress_bar = forget_after_the_first_step
    served_before = base_ward.served()[1].id
    with pytest.raises(DatawardError, match=rf"quarantined model {served_before} \(denoiser of compartment 1\) while this call"):
        pipe(batch_size=1, num_inference_steps=3, output_type="pt")
    pipe.progress_bar = steps
    again = pipe(batch_size=1, num_inference_steps=3, output_type="pt")  # the next call uses the models served now
    used = [m["model"] for m in again.models.values()]
    assert served_before not in used and base_ward.ledger.tainted_models(used) == []
