"""Which model for 28x28 Fashion-MNIST on 2 CPU cores (issue 31 item 2): pixel UNet vs latent ward, with and without a public base.

Figures: BENCHMARKS.md, section "Real images (MNIST, Fashion-MNIST)".

    python benchmarks/real_model_choice.py --workdir DIR --arm ARM [--phase prepare|train|eval] [--data fashion-mnist:subset=10000]
    python benchmarks/real_model_choice.py --workdir DIR --table

Arms (K = 1 wards of ``--data``, the ``tiny`` preset, batch 128, each given the same wall-clock training budget,
``--seconds``, converted to steps by the step time measured on this machine: ``STEP_SECONDS``):

- ``pixel``: the UNet on the 28x28 images, no base;
- ``latent``: a public autoencoder (MNIST, the other data set, resized to 32 px; 32 -> 8x8x4 latents) and the UNet on
  its latents, no base (made after ``latent-base``, it copies that ward and its public models, so both use the same
  autoencoder bytes, and drops the base: its denoiser starts from random weights);
- ``latent-base``: the same, starting from a public latent denoiser trained on MNIST (``--base-steps``);
- ``pixel-base``: the pixel UNet starting from a public pixel denoiser trained on MNIST (``--base-steps``).

Public models (autoencoder, base) are one-off costs cached per user (``training/basecache.py``): their seconds are
printed apart from the ward's. Phases (each fits one 8-minute run): ``prepare`` (ward and public models), ``train``
(the ward's budget), ``eval``: ``--n`` samples (balanced over the 10 classes, DDIM ``--sample-steps`` steps, seed 0),
FD with the pinned fashion-mnist feature net against the fixed test split (10,000), and the DPImageBench protocol
(:func:`dataward.audit.classifier.synthetic_accuracy`: the ImageCNN trained on the samples, tested on the test split);
``--table`` prints the rows from the JSON each phase leaves in ``DIR/<arm>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from dataward.audit.classifier import synthetic_accuracy
from dataward.audit.features import benchmark_feature_net
from dataward.audit.metrics import frechet_distance
from dataward.config import AutoencoderConfig, TrainConfig
from dataward.data import load_source
from dataward.training.kinds import PUBLIC_KINDS
from dataward.ward import Ward

STEP_SECONDS = {"pixel": 1.26, "latent": 0.115}  # one step at batch 128, 2 threads (speed probe, load 1.4)
LATENT = AutoencoderConfig(image_size=32, block_out_channels=(16, 32, 32), latent_channels=4, norm_num_groups=8, steps=1500)


def record(workdir: Path, arm: str, **entries) -> dict:
    path = workdir / f"{arm}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(entries)
    path.write_text(json.dumps(data, indent=2))
    return data


def prepare(workdir: Path, arm: str, data: str, seconds: float, base_steps: int) -> None:
    latent, based = arm.startswith("latent"), arm.endswith("-base")
    steps = round(seconds / STEP_SECONDS["latent" if latent else "pixel"])
    started = time.perf_counter()
    if (workdir / arm / "ward.json").exists():  # a prepare that was stopped: its public models resume where they were
        ward = Ward.open(workdir / arm)
        ward.train(progress=False, only=PUBLIC_KINDS)
    elif arm == "latent" and (workdir / "latent-base" / "ward.json").exists():  # the same public autoencoder, no base
        shutil.copytree(workdir / "latent-base", workdir / arm, ignore=shutil.ignore_patterns("resume", "*.lock", "*-open"))
        ward = Ward.open(workdir / arm)
        ward.reconfigure(base=None)
    else:
        ward = Ward.create(workdir / arm, data, image_size=32 if latent else 28, train=TrainConfig(steps=steps),
                           base="mnist" if based and not latent else None, public_train=TrainConfig(steps=base_steps))
        if latent:
            ward.pretrain("mnist", TrainConfig(steps=base_steps if based else 1), progress=False, latent=True, autoencoder=LATENT,
                          autoencoder_data="mnist", as_base=based)
        elif based:
            ward.train(progress=False, only=PUBLIC_KINDS)
    seconds_before = json.loads((workdir / f"{arm}.json").read_text()).get("public_seconds", 0) if (workdir / f"{arm}.json").exists() else 0
    record(workdir, arm, data=data, steps=steps, public_seconds=round(seconds_before + time.perf_counter() - started, 1), load_prepare=os.getloadavg()[0])
    ward.close()


def train(workdir: Path, arm: str) -> None:
    ward = Ward.open(workdir / arm)
    started = time.perf_counter()
    ward.train(progress=False)
    record(workdir, arm, train_seconds=round(time.perf_counter() - started, 1), load_train=os.getloadavg()[0])
    ward.close()


def evaluate(workdir: Path, arm: str, n: int, sample_steps: int) -> None:
    ward = Ward.open(workdir / arm)
    started = time.perf_counter()
    parts = [ward.sample(n // 10, label=c, seed=c, steps=sample_steps, sampler="ddim") for c in range(10)]
    sample_seconds = time.perf_counter() - started
    name = json.loads((workdir / f"{arm}.json").read_text())["data"].split(":")[0]
    if ward.config.latent:  # how well the public autoencoder (MNIST) represents these images: 1,000 test images
        real = load_source(f"{name}:split=test,subset=1000").resized(ward.config.image_size, 1).images
        with torch.no_grad():
            mse = float((ward.codec().decode(ward.codec().encode(real)) - real).pow(2).mean())
        record(workdir, arm, reconstruction_mse=mse)
    ward.close()
    images = torch.cat([p.images for p in parts]) * 2 - 1  # (n, 1, S, S) in [-1, 1]
    labels = torch.cat([p.labels for p in parts])
    net, test = benchmark_feature_net(name), load_source(f"{name}:split=test")
    reference = net(test.images)
    record(workdir, arm, n=len(images), sample_steps=sample_steps, sample_seconds=round(sample_seconds, 1),
           fd=frechet_distance(net(images), reference),
           synthetic_accuracy=synthetic_accuracy(images, labels, test.images, test.labels), load_eval=os.getloadavg()[0])


def table(workdir: Path) -> None:
    print("| arm | ward training: steps, seconds | public models: seconds | samples (DDIM steps): seconds | autoencoder MSE on test images | FD | synthetic-trained accuracy | load |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(workdir.glob("*.json")):
        r = json.loads(path.read_text())
        print(f"| {path.stem} | {r.get('steps')}, {r.get('train_seconds')} | {r.get('public_seconds')} | {r.get('n')} ({r.get('sample_steps')}): "
              f"{r.get('sample_seconds')} | {r.get('reconstruction_mse', '-')} | {r.get('fd', float('nan')):.2f} | {100 * r.get('synthetic_accuracy', float('nan')):.1f}% | "
              f"{r.get('load_prepare', 0):.1f} / {r.get('load_train', 0):.1f} / {r.get('load_eval', 0):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--arm", choices=("pixel", "latent", "latent-base", "pixel-base"))
    parser.add_argument("--phase", choices=("prepare", "train", "eval"))
    parser.add_argument("--data", default="fashion-mnist:subset=10000")
    parser.add_argument("--seconds", type=float, default=300.0, help="the ward's wall-clock training budget")
    parser.add_argument("--base-steps", type=int, default=1000)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    if args.table:
        table(args.workdir)
    elif args.phase == "prepare":
        prepare(args.workdir, args.arm, args.data, args.seconds, args.base_steps)
    elif args.phase == "train":
        train(args.workdir, args.arm)
    elif args.phase == "eval":
        evaluate(args.workdir, args.arm, args.n, args.sample_steps)


if __name__ == "__main__":
    main()
