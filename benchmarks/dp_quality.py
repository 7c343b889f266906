"""Private fine-tuning on digits: downstream accuracy (CAS) and Fréchet distance at ε ∈ {1, 10, ∞} for attention-only
(DP-LDM), class-embedding-only, rank-8 LoRA adapters (``--methods lora``) and full fine-tuning after public pretraining
and DP from scratch (step time and memory:
``benchmarks/dp_step_time.py``).

Figures: BENCHMARKS.md, section "DP quality (issue 6)".
Figures: BENCHMARKS.md, section "DP of a LoRA compartment (issue 16)".

    python benchmarks/dp_quality.py [--quick] [--threads 2] [--json out.json] [--spaces pixel,latent] [--all-cells]
                                    [--dp-batch 250] [--dp-epochs 15] [--noise-multiplicity K] [--methods full,...]
                                    [--dp-seeds 0,1,2]

Public data: printed digits in 20 typefaces (``printed:count=2000``; the latent autoencoder: ``--ae-data``, pen strokes). Private data: the digits training split (1500). Reference: the
held-out split (297). Every model samples --per-class images per class (DDIM, 20 steps); CAS trains a logistic regression on the
samples only and tests it on the held-out digits (``dataward.audit.metrics.downstream_accuracy``); FD uses the digits
feature CNN (``dataward.audit.features.digits_feature_net``). The CPU budget is ~15 minutes, so the matrix is cut
(see BENCHMARKS.md, "Private fine-tuning").
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
import warnings

import torch

from dataward.audit.features import digits_feature_net
from dataward.audit.metrics import downstream_accuracy, frechet_distance
from dataward.config import AutoencoderConfig, DPConfig, TrainConfig
from dataward.data import load_source
from dataward.diffusion.latent import (
    LatentCodec, LatentDenoiser, autoencoder_loss, latent_scaling_factor, make_latent_scheduler, sample_latent,
)
from dataward.models.adapters import add_lora
from dataward.models.nets import build_autoencoder, build_unet, derive_seed
from dataward.training.dp import dp_finetune
from dataward.training.privacy import plan_dp, trainable_counts, trainable_filter
from dataward.diffusion.sampling import make_sampler, make_training_scheduler, sample_loop, unet_eps
from dataward.training.loop import TrainState, denoiser_loss, run_steps

warnings.filterwarnings("ignore")
SEED = 0
LORA_RANK = 8


def generate(model, codec, per_class: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class samples of each digit: (N, 1, 8, 8) images and (N,) labels."""
    y = torch.arange(10).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(derive_seed(SEED, "bench-sample"))
    training = make_training_scheduler()
    with torch.no_grad():
        if codec is None:
            x_T = torch.randn((len(y), 1, 8, 8), generator=g)
            images = sample_loop(unet_eps(model), x_T, make_sampler(training, "ddim"), steps=steps, y=y, generator=g)
        else:
            images = sample_latent(LatentDenoiser(unet_eps(model), codec), len(y), make_latent_scheduler(training, "ddim"), steps=steps, generator=g, y=y)
    return images.clamp(-1, 1), y


def evaluate(model, codec, heldout, features, args) -> dict:
    images, y = generate(model, codec, args.per_class, args.sample_steps)
    cas = downstream_accuracy(images, y, heldout.images, heldout.labels, seed=SEED)
    fd = frechet_distance(features(images), features(heldout.images))
    return {"cas": cas, "fd": fd}


def train_public(kind: str, model, data, loss, train: TrainConfig) -> TrainState:
    """A public model (``autoencoder``, ``public-denoiser``) trained as ``Ward.pretrain`` trains it for ward seed SEED:
    weights from derive_seed(SEED, kind, None, "init") (the caller builds the model), one stage over the data in ID order
    with the generator derive_seed(SEED, kind, None, "stage", 0)."""
    state = TrainState.fresh(model, train)
    data = data.select(sorted(data.ids))
    generator = torch.Generator().manual_seed(derive_seed(SEED, kind, None, "stage", 0))
    run_steps(state, data, loss, train.total_steps(len(data)), train, generator)
    return state


def start(base, trainable: str):
    """The model a fine-tuning cell starts from: a copy of the public base, with a fresh rank-8 LoRA adapter for ``lora``
    (what a ward made with ``--adapter lora:8`` trains)."""
    return add_lora(base, LORA_RANK, derive_seed(SEED, "lora")) if trainable == "lora" else copy.deepcopy(base)


def nonprivate_finetune(model, data, trainable: str, steps: int, batch: int, lr: float, seed: int) -> TrainState:
    """The ε=∞ counterpart: the same trainable set, batch and step count, no clipping or noise."""
    train = TrainConfig(steps=steps, batch_size=batch, lr=lr, threads=torch.get_num_threads())
    state = TrainState.fresh(model, train, trainable_filter(trainable))
    run_steps(state, data, denoiser_loss(make_training_scheduler()), steps, train, torch.Generator().manual_seed(derive_seed(seed, "np")))
    return state


def print_tables(results: list[dict]) -> None:
    """The rows of BENCHMARKS.md's CAS / FD tables, one table per space; a cell per ε, one "CAS / FD" per DP seed
    (a model without private data, ε None, in the first column)."""
    for space in dict.fromkeys(row["space"] for row in results):
        rows = [row for row in results if row["space"] == space]
        print(f"\nCAS / FD, {space} space:\n\n| method | ε = 1 | ε = 10 | ε = ∞ (same recipe, no noise) |\n|---|---|---|---|")
        for method in dict.fromkeys(row["method"] for row in rows):
            cells = [", ".join(f"{row['cas']:.4f} / {row['fd']:.2f}" for row in rows
                               if row["method"] == method and (row["epsilon"] == eps or (row["epsilon"] is None and eps == 1.0)))
                     for eps in (1.0, 10.0, float("inf"))]
            print(f"| {method} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the script, not figures")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--public-steps", type=int, default=300, help="pretraining steps (public denoiser, non-private scratch reference)")
    parser.add_argument("--dp-epochs", type=int, default=15)
    parser.add_argument("--dp-batch", type=int, default=250, help="expected Poisson batch: q = 1 / ceil(1500 / batch)")
    parser.add_argument("--clip", type=float, default=None, help="DP clipping norm (default: calibrated on the public data; 1.0 from scratch)")
    parser.add_argument("--lr", type=float, default=None, help="DP-SGD learning rate (default: dataward.config.DP_LEARNING_RATES by trainable set)")
    parser.add_argument("--noise-multiplicity", type=int, default=1, help="K draws of (t, noise) per example in every DP cell (DPDM)")
    parser.add_argument("--dp-seeds", default=str(SEED),
                        help="seeds of the attention and embedding DP cells (Poisson batches, noise, clip calibration), e.g. 0,1,2: "
                             "one row each (CAS moves by ~0.03 between seeds)")
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--ae-steps", type=int, default=AutoencoderConfig.steps, help="autoencoder training steps (latent space)")
    parser.add_argument("--ae-data", default="strokes:count=10000", help="the autoencoder's public data (the ward's default)")
    parser.add_argument("--spaces", default="pixel,latent", help="which spaces to run: pixel, latent or both")
    parser.add_argument("--methods", default=None,
                        help="only these fine-tuning methods, e.g. full or attention,scratch, in every space (default: all, latent cut "
                             "to attention and embedding unless --all-cells); the public-only and non-private scratch references always run")
    parser.add_argument("--all-cells", action="store_true",
                        help="the whole matrix: every method at ε ∈ {1, 10, ∞} in pixel and latent space (~2x the time)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    args.per_class, args.sample_steps = (5, 4) if q else (args.per_class, 20)
    public_count, public_steps = (200, 5) if q else (2000, args.public_steps)
    dp_batch, dp_epochs = (100, 1) if q else (args.dp_batch, args.dp_epochs)
    multiplicity = args.noise_multiplicity
    dp_seeds = [int(seed) for seed in args.dp_seeds.split(",")]
    physical = 128
    ae_steps = 5 if q else args.ae_steps

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    private = load_source("digits")
    heldout = load_source("digits:heldout")
    public = load_source(f"printed:count={public_count}")
    features = digits_feature_net()
    scheduler = make_training_scheduler()
    results: list[dict] = []

    def dp_cell(model, data, trainable, eps, seed, calibration):
        """One DP fine-tuning run at the shared settings: the trained state and the row's DP columns."""
        t0 = time.perf_counter()
        config = DPConfig(epsilon=eps, batch=dp_batch, epochs=dp_epochs, trainable=trainable, accountant="prv", max_physical_batch=physical,
                          clip=args.clip, lr=args.lr, noise_multiplicity=multiplicity)
        state, rec = dp_finetune(model, data, config, TrainConfig(), seed=seed, scheduler=scheduler, calibration=calibration)
        return state, {"dp_seed": seed, "sigma": rec.sigma, "eps_spent": rec.epsilon(), "eps_rdp": rec.epsilon("rdp"), "steps": rec.steps,
                       "q": rec.sample_rate, "trainable_fraction": rec.trainable_fraction, "clip": rec.clip, "lr": rec.extra["lr"],
                       "train_s": time.perf_counter() - t0}

    def record(space, method, eps, state_or_model, codec, extra=None):
        model = state_or_model.ema_model() if isinstance(state_or_model, TrainState) else state_or_model
        row = {"space": space, "method": method, "epsilon": eps, **evaluate(model, codec, heldout, features, args), **(extra or {})}
        results.append(row)
        print(json.dumps(row), flush=True)

    real = {"cas_real_train": downstream_accuracy(private.images, private.labels, heldout.images, heldout.labels, seed=SEED),
            "feature_net_heldout_accuracy": features.heldout_accuracy}
    print(json.dumps(real), flush=True)

    for space in args.spaces.split(","):
        t0 = time.perf_counter()
        codec = None
        pub, priv = public, private
        if space == "latent":
            ae_public = load_source("strokes:count=200" if q else args.ae_data)
            ae_config = AutoencoderConfig(steps=ae_steps)
            ae_model = build_autoencoder(ae_config, derive_seed(SEED, "autoencoder", None, "init"))
            autoencoder = train_public("autoencoder", ae_model, ae_public, autoencoder_loss(ae_config.kl_weight), ae_config.train_config(args.threads)).ema_model()
            codec = LatentCodec(autoencoder, latent_scaling_factor(autoencoder, ae_config, ae_public), ae_config)
            pub, priv = codec.encode_dataset(public), codec.encode_dataset(private)
            recon = codec.decode(codec.encode(private.images))
            real["autoencoder_digits_mse"] = float((recon - private.images).pow(2).mean())
            real["autoencoder_printed_mse"] = float((codec.decode(pub.images) - public.images).pow(2).mean())
        _, pub_channels, pub_size, _ = pub.images.shape
        pub_model = build_unet("tiny", pub_size, pub_channels, pub.num_classes, derive_seed(SEED, "public-denoiser", None, "init"))
        pre = train_public("public-denoiser", pub_model, pub, denoiser_loss(scheduler), TrainConfig(steps=public_steps, batch_size=128, lr=2e-3))
        base = pre.ema_model()
        timings[f"{space}_pretrain_s"] = time.perf_counter() - t0
        record(space, "public only", None, base, codec)
        steps = dp_epochs * -(-len(priv) // dp_batch)
        # attention-only (DP-LDM) and class-embedding-only after public pretraining: eps in {1, 10, inf} (latent: {10, inf})
        methods = args.methods.split(",") if args.methods else ["attention", "embedding", "full", "scratch"]
        for trainable in [m for m in ("attention", "embedding", "lora") if m in methods]:
            for eps in (1.0, 10.0) if space == "pixel" or args.all_cells else (10.0,):
                for dp_seed in dp_seeds:
                    state, extra = dp_cell(start(base, trainable), priv, trainable, eps, dp_seed, pub)
                    record(space, f"{trainable} (public pretrain)", eps, state, codec, extra)
            t0 = time.perf_counter()
            state = nonprivate_finetune(start(base, trainable), priv, trainable, steps, dp_batch, DPConfig(trainable=trainable, lr=args.lr).learning_rate(), SEED)
            record(space, f"{trainable} (public pretrain)", float("inf"), state, codec, {"steps": steps, "train_s": time.perf_counter() - t0})
        if space == "latent" and not args.all_cells and args.methods is None:
            continue
        # full DP fine-tuning and DP from scratch: eps=10 only by default (budget); non-private from scratch is the reference
        _, channels, size, _ = priv.images.shape
        for eps in ((1.0, 10.0) if args.all_cells else (10.0,)):
            if "full" in methods:
                state, extra = dp_cell(copy.deepcopy(base), priv, "full", eps, SEED, pub)
                record(space, "full (public pretrain)", eps, state, codec, extra)
            if "scratch" in methods:
                fresh = build_unet("tiny", size, channels, 10, seed=derive_seed(SEED, "scratch"))
                state, extra = dp_cell(fresh, priv, "full", eps, SEED, None)  # no public data: C = 1
                record(space, "full (DP from scratch)", eps, state, codec, extra)
        if args.all_cells and "full" in methods:
            t0 = time.perf_counter()
            state = nonprivate_finetune(copy.deepcopy(base), priv, "full", steps, dp_batch, DPConfig(trainable="full", lr=args.lr).learning_rate(), SEED)
            record(space, "full (public pretrain)", float("inf"), state, codec, {"steps": steps, "train_s": time.perf_counter() - t0})
        t0 = time.perf_counter()
        scratch_steps = 5 if q else public_steps
        train = TrainConfig(steps=scratch_steps, batch_size=128, lr=2e-3)
        state = TrainState.fresh(build_unet("tiny", size, channels, 10, seed=derive_seed(SEED, "scratch")), train)
        run_steps(state, priv, denoiser_loss(scheduler), scratch_steps, train, torch.Generator().manual_seed(derive_seed(SEED, "scratch-np")))
        record(space, "full (non-private from scratch)", float("inf"), state, codec, {"steps": scratch_steps, "batch": 128, "train_s": time.perf_counter() - t0})

    reference_model = build_unet("tiny", 8, 1, 10, seed=0)
    selected = plan_dp(DPConfig(accountant="rdp", batch=dp_batch), len(private), reference_model)
    summary = {
        "real": real,
        "results": results,
        "timings": timings,
        "trainable_fraction_attention": selected.trainable_fraction,
        "trainable_params_attention": selected.trainable_params,
        "trainable_params_embedding": trainable_counts(reference_model, "embedding")[0],
        "total_params": selected.total_params,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "total_s": time.perf_counter() - t_start,
        "settings": {"public": f"printed:count={public_count}", "ae_data": args.ae_data, "ae_steps": ae_steps, "public_steps": public_steps, "dp_batch": dp_batch, "dp_epochs": dp_epochs, "noise_multiplicity": multiplicity, "dp_seeds": dp_seeds,
                     "clip": args.clip, "lr": args.lr, "physical": physical, "per_class": args.per_class, "sample_steps": args.sample_steps, "threads": args.threads,
                     "all_cells": args.all_cells},
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}), flush=True)
    print_tables(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
