"""Non-private quality on real images (issue 31): FD and synthetic-trained accuracy of a K = 1 ward vs the classifier trained on real images.

Figures: BENCHMARKS.md, section "Real images (MNIST, Fashion-MNIST)".

    python benchmarks/real_quality.py [--ward DIR] [--data fashion-mnist] [--n 2000] [--sample-steps 20] [--real 10000,60000]

``--ward``: a trained K = 1 ward of ``mnist`` or ``fashion-mnist`` (e.g. made by ``dataward init W --data
fashion-mnist:subset=10000`` and ``dataward train W``, or an arm of ``benchmarks/real_model_choice.py``). Rows:

- the ward: ``--n`` samples (balanced over the 10 classes, DDIM ``--sample-steps`` steps, seeds 0-9), FD to the fixed
  test split with the pinned feature net, and the DPImageBench protocol: :func:`dataward.audit.classifier.synthetic_accuracy`
  (the ImageCNN, its default recipe, trained on the samples and their labels, tested on the whole test split);
- (without ``--ward``, only the ceiling rows of ``--data``) the ceiling: the same classifier trained on ``N`` real training images (``<name>:subset=N``) for each N in ``--real``
  (the ward's own N and the whole training split), with the FD of ``--n`` of them (the floor a perfect model reaches).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from dataward.audit.classifier import synthetic_accuracy
from dataward.audit.features import benchmark_feature_net
from dataward.audit.metrics import frechet_distance
from dataward.data import load_source
from dataward.ward import Ward


def ward_row(path: Path, n: int, sample_steps: int) -> tuple[str, dict]:
    """The data set's name and the ward's row: its samples' FD and synthetic-trained accuracy."""
    ward = Ward.open(path)
    name, config = ward.config.data.split(":")[0], ward.config
    started = time.perf_counter()
    parts = [ward.sample(n // 10, label=c, seed=c, steps=sample_steps, sampler="ddim") for c in range(10)]
    seconds = time.perf_counter() - started
    ward.close()
    images, labels = torch.cat([p.images for p in parts]) * 2 - 1, torch.cat([p.labels for p in parts])
    net, test = benchmark_feature_net(name), load_source(f"{name}:split=test")
    layout = f"latent {'x'.join(map(str, config.model_shape()))}" if config.latent else f"pixel {config.image_size} px"
    row = {"what": f"ward `{config.data}` ({layout}, {config.model}, {config.train.steps or config.train.epochs} "
                   f"{'steps' if config.train.steps else 'epochs'}): {n} samples, DDIM {sample_steps} ({seconds:.0f} s)",
           "fd": frechet_distance(net(images), net(test.images)), "accuracy": synthetic_accuracy(images, labels, test.images, test.labels)}
    return name, row


def ceiling_row(name: str, n_real: int, n_fd: int) -> dict:
    """The classifier trained on ``n_real`` real training images, and the FD of ``n_fd`` real training images."""
    real, test = load_source(f"{name}:subset={n_real}"), load_source(f"{name}:split=test")
    net = benchmark_feature_net(name)
    started = time.perf_counter()
    accuracy = synthetic_accuracy(real.images, real.labels, test.images, test.labels)
    fd = frechet_distance(net(real.images[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:n_fd]]), net(test.images))
    return {"what": f"ceiling: {n_real:,} real training images ({time.perf_counter() - started:.0f} s to train)", "fd": fd, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ward", type=Path)
    parser.add_argument("--data", default="fashion-mnist", choices=("mnist", "fashion-mnist"), help="without --ward: whose ceiling")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--real", default="10000,60000", help="sizes of the real training sets of the ceiling rows")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    name, rows = args.data, []
    if args.ward is not None:
        name, row = ward_row(args.ward, args.n, args.sample_steps)
        rows.append(row)
    rows += [ceiling_row(name, int(n), args.n) for n in args.real.split(",") if n]
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    print(f"| {name} | FD (pinned {name}-cnn, vs the 10,000 test images) | synthetic-trained accuracy (ImageCNN, real test split) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['fd']:.2f} | {100 * r['accuracy']:.1f}% |")


if __name__ == "__main__":
    main()
