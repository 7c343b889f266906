"""Guarded sampling (CPSample): unguarded vs the paper's guard vs the calibrated guard, same seeds, side by side.

Figures: BENCHMARKS.md, section "Calibrated guard (issue 17)".

Two wards, each one denoiser and its guards trained the way a ward trains compartment 0's guard:

- the memorization testbed: the tiny UNet trained with ``MEMORIZE_PRESET`` on ``digits:subset=64`` (unconditional), long
  enough that it replicates training images;
- the full digits (1,500 training images, the same budget in steps), where unguarded replication is low.

Each arm is a guard (its calibration weight: 0 is the paper's guard) applied with a scale s and threshold α. For every
arm, from the same initial noise and generator per sampling seed:

- replication: nearest / second-nearest training L2 < 1/3 (Gu et al. 2023), pooled over the seeds, and the share of
  samples whose feature cosine to the nearest training image exceeds the audit's threshold;
- Fréchet distance (digits feature CNN) to the 297 held-out digits, mean over the seeds;
- loss-attack membership inference (Matsumoto et al. 2023) against the denoiser a guarded sampler uses, ε̂, the
  training images vs the 297 held-out digits;
- sampling wall time / unguarded;
- the oracle filter: the unguarded samples minus exactly their replicas, the best any replica remover can do with this
  denoiser (FD of what is kept / FD of random subsets of the same size);
- how often the guard is confident (max p > 1 − α) on its members, on public images it never trained on, and on the
  held-out digits, at t = 0-500.

Run:  python benchmarks/guard_replication.py         (about 15 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import dataward  # noqa: F401  (threading defaults before torch loads)
import torch

from dataward.audit.attacks import loss_attack
from dataward.audit.features import digits_feature_net
from dataward.audit.metrics import frechet_distance, replication
from dataward.config import GuardConfig
from dataward.data import Dataset, load_source
from dataward.diffusion.sampling import make_sampler, make_training_scheduler, sample_loop, unet_eps
from dataward.models.guard import (
    ACCURACY_TIMESTEPS,
    MEMORIZE_PRESET,
    MEMORIZE_SUBSET,
    GuardActivity,
    build_guard,
    guard_confidence_by_t,
    guard_guidance,
    guard_labels,
    guarded,
    split_nonmembers,
)
from dataward.models.nets import build_unet, derive_seed
from dataward.training.kinds import guard_loss, guard_model
from dataward.training.loop import TrainState, denoiser_loss, run_steps

DEFAULT_ARMS = "paper:0:10:0.01,calibrated:1:30:0.1,calibrated-s100:1:100:0.1"  # the paper's guard at the old defaults; the new default; a stronger one
SCHEDULER = make_training_scheduler()


def log(message: str) -> None:
    """Progress on stderr (the figures go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def parse_arms(text: str) -> list[tuple[str, float, float, float]]:
    """``name:weight:s:alpha,...`` -> [(name, calibration weight, scale, alpha)]."""
    arms = []
    for part in text.split(","):
        name, weight, scale, alpha = part.split(":")
        arms.append((name, float(weight), float(scale), float(alpha)))
    return arms


def train_denoiser(members: Dataset, seed: int) -> torch.nn.Module:
    unet = build_unet("tiny", 8, 1, None, derive_seed(seed, "unet"))
    state = TrainState.fresh(unet, MEMORIZE_PRESET)
    run_steps(state, members, denoiser_loss(SCHEDULER), MEMORIZE_PRESET.total_steps(len(members)), MEMORIZE_PRESET,
              torch.Generator().manual_seed(derive_seed(seed, "unet-train")))
    unet.load_state_dict(state.ema_state_dict())
    return unet.eval().requires_grad_(False)


def train_guard(members: Dataset, config: GuardConfig, seed: int, nonmembers: torch.Tensor) -> torch.nn.Module:
    """The guard a ward with ``seed`` trains for compartment 0 (one stage, IDs in order)."""
    ordered = members.select(sorted(members.ids))
    train = config.train_config()
    state = TrainState.fresh(build_guard(1, derive_seed(seed, "guard", 0, "init"), config), train)
    run_steps(state, ordered, guard_loss(SCHEDULER, config, nonmembers), train.total_steps(len(ordered)), train,
              torch.Generator().manual_seed(derive_seed(seed, "guard", 0, "stage", 0)), targets=guard_labels(ordered.ids, seed))
    return guard_model(state)


def run_ward(name: str, members: Dataset, heldout: Dataset, public: tuple[torch.Tensor, torch.Tensor], args, arms) -> dict:
    """Every arm on one ward; returns its rows and guard confidences."""
    clock = time.perf_counter()
    unet = train_denoiser(members, args.seed)
    log(f"[{name}] denoiser trained in {time.perf_counter() - clock:.0f} s")
    guards, confidence = {}, {}
    for weight in sorted({arm[1] for arm in arms}):
        config = replace(GuardConfig(), nonmember_weight=weight, steps=args.guard_steps if len(members) > MEMORIZE_SUBSET else None)
        start = time.perf_counter()
        guards[weight] = train_guard(members, config, derive_seed(args.seed, "guard"), public[0])
        log(f"[{name}] guard (weight {weight}) trained in {time.perf_counter() - start:.0f} s")
    net = digits_feature_net()
    f_heldout = net(heldout.images)
    eps = unet_eps(unet)
    sampler = make_sampler(SCHEDULER, "ddim")
    rows: dict[str, dict] = {}
    for arm_name, weight, scale, alpha in [("unguarded", None, 0.0, 0.01)] + arms:
        guard = guards.get(weight)
        if guard is not None:
            confidence[arm_name] = {
                what: guard_confidence_by_t(guard, images, alpha, SCHEDULER, ACCURACY_TIMESTEPS, torch.Generator().manual_seed(1))
                for what, images in (("members", members.images), ("public", public[1]), ("heldout", heldout.images))}
        images, fds, seconds, activity = [], [], 0.0, GuardActivity()
        for sample_seed in args.seeds:
            guidance = None if guard is None else guard_guidance(guard, scale, alpha, GuardConfig().max_timestep, activity)
            x_T = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(derive_seed(sample_seed, "x_T")))
            start = time.perf_counter()
            x = sample_loop(eps, x_T, sampler, steps=args.steps, guidance=guidance,
                            generator=torch.Generator().manual_seed(derive_seed(sample_seed, "sample"))).clamp(-1, 1)
            seconds += time.perf_counter() - start
            images.append(x)
            fds.append(frechet_distance(net(x), f_heldout))
        x = torch.cat(images)
        rep = replication(x, members.images, features=net.copy_features)
        denoiser = eps if guard is None else guarded(eps, guard_guidance(guard, scale, alpha, GuardConfig().max_timestep), SCHEDULER.alphas_cumprod)
        attack = loss_attack(denoiser, SCHEDULER, members.images, heldout.images, seed=args.seed)
        if guard is None:
            oracle = oracle_filter(images, rep.replicated, net, f_heldout)
        rows[arm_name] = {"replication": rep.replication_rate, "cosine share": rep.cosine_share, "FD": sum(fds) / len(fds),
                          "FD by seed": fds, "seconds": seconds, "loss-attack AUC": attack.auc, "attack best t": attack.best_t,
                          "steered": activity.share, "weight": weight, "s": scale, "alpha": alpha}
        log(f"[{name}] {arm_name}: replication {rep.replication_rate:.4f}, FD {rows[arm_name]['FD']:.2f}, {seconds:.0f} s, AUC {attack.auc:.3f}")
    return {"rows": rows, "confidence": confidence, "oracle": oracle, "seconds": time.perf_counter() - clock}


def oracle_filter(images: list[torch.Tensor], replicated, net, f_heldout: torch.Tensor) -> dict:
    """The best any replica remover can do with this denoiser: its unguarded samples minus exactly their replicas. FD of
    what is kept, per seed, against FD of a random subset of the same size (FD depends on the sample count)."""
    kept_fd, same_size_fd, kept = [], [], []
    start = 0
    for x in images:
        keep = ~torch.as_tensor(replicated[start:start + len(x)])
        start += len(x)
        chosen = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: int(keep.sum())]
        kept_fd.append(frechet_distance(net(x[keep]), f_heldout))
        same_size_fd.append(frechet_distance(net(x[chosen]), f_heldout))
        kept.append(int(keep.sum()))
    fd, fd_same = sum(kept_fd) / len(kept_fd), sum(same_size_fd) / len(same_size_fd)
    log(f"oracle filter: kept {kept} of {[len(x) for x in images]}, FD {fd:.2f} vs {fd_same:.2f} for random subsets of the same size")
    return {"kept": kept, "FD": fd, "FD same size": fd_same, "FD ratio": fd / fd_same}


def print_ward(name: str, result: dict) -> None:
    """The ward's rows of the tables in BENCHMARKS.md: the arms, the oracle filter, and how often each guard is sure."""
    rows = result["rows"]
    base = rows["unguarded"]
    print(f"\n## {name} ({result['seconds']:.0f} s)\n")
    print("| arm | weight | s | α | replicas | cosine share | FD | FD / unguarded | time / unguarded | loss-attack AUC | steered |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arm, r in rows.items():
        steered = "-" if r["steered"] is None else f"{100 * r['steered']:.1f}%"
        weight = "-" if r["weight"] is None else f"{r['weight']:g}"
        s, alpha = ("-", "-") if r["weight"] is None else (f"{r['s']:g}", f"{r['alpha']:g}")
        print(f"| {arm} | {weight} | {s} | {alpha} | {100 * r['replication']:.2f}% | {100 * r['cosine share']:.2f}% | {r['FD']:.2f} "
              f"| {r['FD'] / base['FD']:.3f} | {r['seconds'] / base['seconds']:.3f} | {r['loss-attack AUC']:.3f} | {steered} |")
    oracle = result["oracle"]
    print("\n| | kept (seeds) | FD | FD / same-size random subsets |\n|---|---|---|---|")
    print(f"| unguarded samples minus their replicas | {', '.join(map(str, oracle['kept']))} | {oracle['FD']:.2f} "
          f"| **{oracle['FD ratio']:.3f}** (vs {oracle['FD same size']:.2f}) |")
    confidence = result["confidence"]
    if confidence:
        first = next(iter(confidence.values()))
        steps = " / ".join(str(t) for t in next(iter(first.values())))
        print(f"\n| guard (share sure enough to steer at t = {steps}) | " + " | ".join(first) + " |\n" + "|---" * (len(first) + 1) + "|")
        for arm, by_what in confidence.items():
            print(f"| {arm} | " + " | ".join(" / ".join(f"{v:.3f}" for v in by_t.values()) for by_t in by_what.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=1000, help="generated images per arm and sampling seed")
    parser.add_argument("--seeds", type=lambda text: [int(v) for v in text.split(",")], default=[0, 1, 2], help="sampling seeds")
    parser.add_argument("--steps", type=int, default=50, help="DDIM sampling steps")
    parser.add_argument("--arms", type=parse_arms, default=parse_arms(DEFAULT_ARMS), help="name:weight:s:alpha,... (weight 0: the paper's guard)")
    parser.add_argument("--wards", default="testbed,full", help="testbed (digits:subset=64), full (all training digits)")
    parser.add_argument("--guard-steps", type=int, default=1500, help="guard steps on the full digits (its epochs would be 11,700 steps)")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    heldout = load_source("digits:heldout")
    public = split_nonmembers(load_source(GuardConfig().nonmembers).images)
    results = {}
    for ward in args.wards.split(","):
        spec = {"testbed": f"digits:subset={MEMORIZE_SUBSET}", "full": "digits"}[ward]
        members = load_source(spec)
        results[ward] = run_ward(ward, Dataset(members.ids, members.images, None), heldout, public, args, args.arms)
    print(f"# guarded sampling: {args.samples} samples x seeds {args.seeds}, DDIM {args.steps}, guards t < {GuardConfig().max_timestep}, "
          f"{args.threads} threads; replication pooled over seeds, FD mean over seeds; ratios to unguarded")
    for ward, result in results.items():
        print_ward(ward, result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "arms"} | {"arms": args.arms}, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
