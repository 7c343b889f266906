"""Cost of checking a model's weights against the ledger's hash on load / one sample call (issue 19, goal < 5%).

Figures: BENCHMARKS.md, section "Reliability".

    python benchmarks/weight_check_cost.py [--rounds 5] [--n 16] [--steps 50]

A one-compartment ``tiny`` ward (400 digits, 20 training steps). Each round, in this process: the hash check alone
(``checkpoint_hash`` of the served denoiser, what ``ModelCache.get`` adds to a load), and a sample call on a freshly
opened ward (load + check + ``--n`` samples x ``--steps`` steps). Printed: medians and their ratio, and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import dataward  # noqa: F401  (first: numerics)
import torch

from dataward.config import TrainConfig
from dataward.store.checkpoints import checkpoint_hash
from dataward.ward import Ward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as scratch:
        ward = Ward.create(f"{scratch}/w", "digits:subset=400", router=False, train=TrainConfig(steps=20, batch_size=128))
        ward.train()
        folder = ward.path / ward.served()[0].path
        checks, samples = [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            checkpoint_hash(folder)
            checks.append(time.perf_counter() - started)
            started = time.perf_counter()
            Ward.open(ward.path).sample(args.n, seed=0, steps=args.steps)
            samples.append(time.perf_counter() - started)
    check, sample = statistics.median(checks), statistics.median(samples)
    print(f"hash check {check * 1000:.1f} ms; sample call (open + load + {args.n} x {args.steps} steps) {sample * 1000:.0f} ms; "
          f"ratio {check / sample:.4f}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| figure | value | goal | command | commit |\n|---|---|---|---|---|")
    print(f"| weight check on load / a sample call of {args.n} samples x {args.steps} steps (median of {args.rounds}) | **{100 * check / sample:.1f}%** "
          f"({check * 1000:.1f} ms / {sample * 1000:.0f} ms) | < 5% | `python benchmarks/weight_check_cost.py` | |")


if __name__ == "__main__":
    main()
