"""Seconds per training step and per sample on this machine, by model preset and image size (issue 20).

Figures: BENCHMARKS.md, section "diffusers pipeline, exports and image sizes (issue 20)".

`tiny` at 8x8 (digits, 1 channel) and `small` at 16 and 32 px (the bundled RGB shapes, 3 channels); one compartment,
one slice, batch 32, no base; sampling: DDIM, 50 steps, 8 images. One process, one arm after the other.

    python benchmarks/size_cost.py --train-steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

ARMS = [("tiny", 8, "digits:subset=400"), ("small", 16, "shapes:count=400,size=16"), ("small", 32, "shapes:count=400,size=32")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    from dataward.config import TrainConfig
    from dataward.ward import Ward

    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="dataward-size-"))
    rows = []
    try:
        for preset, size, data in ARMS:
            ward = Ward.create(scratch / f"{preset}-{size}", data, model=preset, image_size=size, router=False, base=None,
                               train=TrainConfig(steps=args.train_steps, batch_size=32, threads=args.threads))
            started = time.perf_counter()
            ward.train()
            train_s = time.perf_counter() - started
            ward.sample(1, steps=2, sampler="ddim")  # load the model
            started = time.perf_counter()
            ward.sample(args.n, steps=args.steps, sampler="ddim")
            sample_s = time.perf_counter() - started
            params = sum(p.numel() for p in ward.model(ward.served()[0]).parameters())
            rows.append({"preset": preset, "size": size, "channels": ward.config.channels, "parameters": params,
                         "seconds_per_train_step_batch32": round(train_s / args.train_steps, 4),
                         "seconds_per_sample_50_steps": round(sample_s / args.n, 4)})
            ward.close()
        print(json.dumps({"cpus": os.cpu_count(), "threads": args.threads, "load_avg_1m": round(os.getloadavg()[0], 2),
                          "cuda_available": torch.cuda.is_available(), "rows": rows}, indent=2))
        print(f"\n| preset | size | channels | parameters | s / training step (batch 32) | s / sample ({args.steps} steps) |\n|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['preset']} | {row['size']} | {row['channels']} | {row['parameters']:,} | {row['seconds_per_train_step_batch32']} "
                  f"| {row['seconds_per_sample_50_steps']} |")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
