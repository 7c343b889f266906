"""Pretraining the tiny text-to-image base (issue 32) on public captioned shapes, and whether its captions steer it.

    python benchmarks/text_base.py [--count 2000] [--ae-steps 600] [--steps 1500] [--threads 2] [--seed 0] [--save DIR]

Trains :func:`dataward.text.pretrain.pretrain_stack` on ``captioned-shapes:split=public`` (32x32 RGB) and prints one
JSON row: the wall time of each stage and the colour gap (:func:`dataward.text.pretrain.colour_gap`: mean R − B of 8
samples for "a large red square in the centre on a grey background" minus that for "blue", 20 DDIM steps, guidance 3),
for the pretrained base and for the untrained stack of the same seed (the reference: about 0).

Figures: BENCHMARKS.md, section "Text-to-image base (issue 32)".
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--ae-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="save the pretrained pipeline folder here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dataward.data import load_source
    from dataward.text.pretrain import PretrainConfig, colour_gap, pretrain_stack
    from dataward.text.stack import StackConfig, build_stack, save_stack

    data = load_source(f"captioned-shapes:split=public,count={args.count},seed={args.seed}")
    base = PretrainConfig()
    pretrain = replace(base, autoencoder=replace(base.autoencoder, steps=args.ae_steps), denoiser=replace(base.denoiser, steps=args.steps))
    with tempfile.TemporaryDirectory() as scratch:
        untrained = build_stack(StackConfig(), args.seed, Path(scratch) / "vocabulary-untrained")
        untrained.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        pipe = pretrain_stack(data, StackConfig(), pretrain, args.seed, Path(scratch) / "vocabulary")
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        gap = colour_gap(pipe)
        sample_s = time.perf_counter() - start
        if args.save:
            save_stack(pipe, args.save)
        row = {"count": args.count, "ae_steps": args.ae_steps, "steps": args.steps, "threads": args.threads, "train_s": round(train_s, 1),
               "colour_gap_pretrained": round(gap, 4), "colour_gap_untrained": round(colour_gap(untrained), 4),
               "colour_gap_s": round(sample_s, 1)}
    print(json.dumps(row))
    print("| count | autoencoder steps | denoiser steps | train time | colour gap, pretrained | colour gap, untrained |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.count:,} | {args.ae_steps} | {args.steps} | {row['train_s']} s | {row['colour_gap_pretrained']} | "
          f"{row['colour_gap_untrained']} |")


if __name__ == "__main__":
    main()
