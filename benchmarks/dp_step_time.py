"""DP step time / non-private step time for the same trainable set, and peak memory per mode (issue 6).

Figures: BENCHMARKS.md, section "Step time and memory".

    python benchmarks/dp_step_time.py [--rounds 5] [--steps 4] [--batch 250] [--physical 128] [--threads 2] [--json out.json]

Model: the ``tiny`` preset (8x8 digits), the digits training split. For each trainable set (``attention``: DP-LDM's
attention modules + class embedding; ``embedding``: the class embedding only; ``full``) two variants run the same number of logical steps:

- ``dp``: ``dataward.training.dp.run_private_epochs`` (opacus: Poisson batches of expected size --batch split into physical
  batches of at most --physical, per-sample gradients, clipping, noise; ``noise_multiplicity`` 1);
- ``plain``: ``dataward.training.loop.run_steps`` with batch --batch (one forward/backward per step, no clipping or noise).

Every round runs --steps logical steps of each of the six variants in a rotated order, so a load change on the shared
machine hits all of them alike; the figure is the median over rounds of the per-round ratio dp / plain. Peak memory:
each variant runs once more in a fresh subprocess, and its peak RSS (``VmHWM``) is printed beside that of a subprocess
that only builds the model and data (the baseline the training adds to).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
TRAINABLE_SETS = ("attention", "embedding", "full")
VARIANTS = tuple(f"{t}-{mode}" for t in TRAINABLE_SETS for mode in ("dp", "plain"))


def setup(args):
    from dataward.data import load_source
    from dataward.models.nets import build_unet

    data = load_source("digits")
    return build_unet("tiny", 8, 1, 10, seed=0), data.select(list(data.ids[: args.batch * args.steps]))


def run_variant(variant: str, base, data, args) -> float:
    """Seconds per logical step of one variant over --steps steps (fresh optimizer state, same weights)."""
    from dataward.config import DPConfig, TrainConfig
    from dataward.training.dp import make_private, run_private_epochs
    from dataward.training.privacy import trainable_filter
    from dataward.diffusion.sampling import make_training_scheduler
    from dataward.training.loop import TrainState, denoiser_loss, run_steps

    trainable, mode = variant.split("-")
    loss = denoiser_loss(make_training_scheduler())
    train = TrainConfig(batch_size=args.batch, lr=1e-3, threads=args.threads)
    state = TrainState.fresh(copy.deepcopy(base), train, trainable_filter(trainable))
    generator = torch.Generator().manual_seed(1)
    if mode == "plain":
        t0 = time.perf_counter()
        run_steps(state, data, loss, args.steps, train, generator)
        return (time.perf_counter() - t0) / args.steps
    config = DPConfig(epsilon=10, batch=args.batch, epochs=1, trainable=trainable, accountant="rdp", max_physical_batch=args.physical)
    private = make_private(state, data, config, seed=0)  # one epoch of len(data) / batch = --steps logical steps
    try:
        t0 = time.perf_counter()
        run_private_epochs(private, loss, generator)
        return (time.perf_counter() - t0) / state.step
    finally:
        private.close()


def own_peak_rss_mib() -> float:
    """This process's peak RSS since it started (``VmHWM``: unlike ``ru_maxrss``, not inherited across fork and exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def peak_rss_mib(variant: str | None, args) -> float:
    """Peak RSS of a fresh subprocess that runs ``variant`` once (None: only builds the model and data)."""
    command = [sys.executable, __file__, "--child", variant or "none", "--steps", str(args.steps), "--batch", str(args.batch),
               "--physical", str(args.physical), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="logical steps per variant per round")
    parser.add_argument("--batch", type=int, default=250, help="(expected) logical batch")
    parser.add_argument("--physical", type=int, default=128, help="DP: largest physical batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, data = setup(args)
    if args.child is not None:
        if args.child != "none":
            run_variant(args.child, base, data, args)
        print(own_peak_rss_mib())
        return

    for variant in VARIANTS:  # warm-up: first-call costs (opacus imports, allocator) stay out of the rounds
        run_variant(variant, base, data, args)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            seconds[variant].append(run_variant(variant, base, data, args))
        print(json.dumps({"round": r, **{v: round(s[-1], 4) for v, s in seconds.items()}}), flush=True)
    summary: dict = {"settings": vars(args) | {"load_avg": os.getloadavg()}}
    for trainable in TRAINABLE_SETS:
        ratios = [d / p for d, p in zip(seconds[f"{trainable}-dp"], seconds[f"{trainable}-plain"])]
        summary[trainable] = {
            "dp_s": statistics.median(seconds[f"{trainable}-dp"]), "plain_s": statistics.median(seconds[f"{trainable}-plain"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        }
    summary["peak_rss_mib"] = {"baseline": peak_rss_mib(None, args)} | {v: peak_rss_mib(v, args) for v in VARIANTS}
    print(json.dumps(summary, indent=2), flush=True)
    print(f"\n| trainable set | ratio, {args.threads} thread(s) | DP s / step | non-private s / step | peak RSS DP / non-private (MiB) |"
          "\n|---|---|---|---|---|")
    rss = summary["peak_rss_mib"]
    for trainable in TRAINABLE_SETS:
        s = summary[trainable]
        print(f"| `{trainable}` | **{s['ratio_median']:.3f}** ({s['ratio_min']:.3f}-{s['ratio_max']:.3f}) | {s['dp_s']:.3f} | {s['plain_s']:.3f} "
              f"| {rss[f'{trainable}-dp']:.0f} / {rss[f'{trainable}-plain']:.0f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
