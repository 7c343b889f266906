"""Guarded sampling (CPSample) on the memorization testbed: unguarded vs guarded, same seeds, side by side.

The testbed: the tiny UNet trained with ``MEMORIZE_PRESET`` on ``digits:subset=N`` (unconditional), long enough that it
replicates training images; a guard trained on the same N images with random bits. Reported for both samplers' outputs
from the same initial noise and generator:

- replication: nearest / second-nearest training L2 < 1/3 (Gu et al. 2023) and the share of samples whose feature
  cosine to the nearest training image exceeds the audit's threshold (CPSample's protocol);
- Fréchet distance (digits feature CNN) to the 297 held-out digits;
- loss-attack membership inference (Matsumoto et al. 2023), the N members vs the 297 held-out digits, against the raw
  denoiser and the guarded one (the guard's ε̂ is what a user of the guarded sampler can query);
- sampling wall time, guarded / unguarded.

Run:  python benchmarks/guard_replication.py            (about 5-8 minutes on 2 shared CPU cores)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dataward.audit.features import digits_feature_net
from dataward.audit.attacks import loss_attack
from dataward.audit.metrics import frechet_distance, replication
from dataward.data import Dataset, load_source
from dataward.models.guard import (
    MEMORIZE_PRESET,
    MEMORIZE_SUBSET,
    GuardConfig,
    guard_accuracy_by_t,
    guard_guidance,
    build_guard,
    guard_labels,
    guard_loss,
    guard_model,
    guarded,
)
from dataward.models.nets import build_unet, derive_seed
from dataward.diffusion.sampling import make_sampler, make_training_scheduler, sample_loop, unet_eps
from dataward.training.loop import TrainState, denoiser_loss, run_steps


def log(message: str) -> None:
    """Progress on stderr (the figures go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=MEMORIZE_SUBSET, help="training subset size (digits:subset=N)")
    parser.add_argument("--samples", type=int, default=500, help="generated images per arm")
    parser.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--scale", type=float, default=GuardConfig().scale, help="guidance scale s")
    parser.add_argument("--alpha", type=float, default=GuardConfig().alpha, help="threshold α: guide where max p > 1 - α")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter()

    members = load_source(f"digits:subset={args.n}")
    members = Dataset(members.ids, members.images, None)  # unconditional denoiser
    heldout = load_source("digits:heldout")
    scheduler = make_training_scheduler()

    # the memorizing denoiser
    unet = build_unet("tiny", 8, 1, None, derive_seed(args.seed, "unet"))
    state = TrainState.fresh(unet, MEMORIZE_PRESET)
    run_steps(state, members, denoiser_loss(scheduler), MEMORIZE_PRESET.total_steps(len(members)), MEMORIZE_PRESET,
              torch.Generator().manual_seed(derive_seed(args.seed, "unet-train")))
    unet.load_state_dict(state.ema_state_dict())
    unet.eval().requires_grad_(False)
    t_unet = time.perf_counter() - clock
    log(f"denoiser trained in {t_unet:.0f} s")

    # its guard, on the same images, trained as a ward with seed guard_seed trains compartment 0's guard (one stage, ID order)
    config = GuardConfig(scale=args.scale, alpha=args.alpha)
    guard_seed = derive_seed(args.seed, "guard")
    ordered = members.select(sorted(members.ids))
    guard_state = TrainState.fresh(build_guard(1, derive_seed(guard_seed, "guard", 0, "init"), config), config.train_config())
    run_steps(guard_state, ordered, guard_loss(scheduler, config), config.train_config().total_steps(len(ordered)), config.train_config(),
              torch.Generator().manual_seed(derive_seed(guard_seed, "guard", 0, "stage", 0)), targets=guard_labels(ordered.ids, guard_seed))
    guard = guard_model(guard_state)
    t_guard = time.perf_counter() - clock - t_unet
    log(f"guard trained in {t_guard:.0f} s")
    labels = guard_labels(members.ids, guard_seed)
    acc_t = [0, 100, 200, 300, 400, 500, config.max_timestep - 1, 800]
    acc_members = guard_accuracy_by_t(guard, members, labels, scheduler, acc_t, torch.Generator().manual_seed(1))
    acc_heldout = guard_accuracy_by_t(guard, heldout, guard_labels(heldout.ids, guard_seed), scheduler, acc_t,
                                      torch.Generator().manual_seed(1))

    eps = unet_eps(unet)
    guidance = guard_guidance(guard, config.scale, config.alpha, config.max_timestep)
    sampler = make_sampler(scheduler, args.sampler)
    x_T = torch.randn(args.samples, 1, 8, 8, generator=torch.Generator().manual_seed(derive_seed(args.seed, "x_T")))
    images, seconds = {}, {}
    for arm, g in (("unguarded", None), ("guarded", guidance)):
        start = time.perf_counter()
        x = sample_loop(eps, x_T, sampler, steps=args.steps, guidance=g, generator=torch.Generator().manual_seed(derive_seed(args.seed, "sample")))
        seconds[arm] = time.perf_counter() - start
        images[arm] = x.clamp(-1, 1)
        log(f"{arm}: {args.samples} samples in {seconds[arm]:.0f} s")

    net = digits_feature_net()
    f_heldout = net(heldout.images)
    rows: dict[str, dict[str, float]] = {}
    for arm, x in images.items():
        rep = replication(x, members.images, features=net.copy_features)
        rows[arm] = {
            "replication (L2 ratio < 1/3)": rep.replication_rate,
            f"feature cosine > {rep.cosine_threshold}": rep.cosine_share,
            "median nearest L2": float(rep.summary()["nearest_l2_median"]),
            "Frechet distance to held-out": frechet_distance(net(x), f_heldout),
            "sampling seconds": seconds[arm],
        }
    for arm, denoiser in (("unguarded", eps), ("guarded", guarded(eps, guidance, scheduler.alphas_cumprod))):
        attack = loss_attack(denoiser, scheduler, members.images, heldout.images, seed=args.seed)
        rows[arm]["loss-attack AUC"] = attack.auc
        rows[arm]["loss-attack TPR@1%FPR"] = attack.tpr_at_1pct_fpr
        rows[arm]["loss-attack best t"] = attack.best_t
        log(f"loss attack against the {arm} denoiser: AUC {attack.auc:.3f}")

    print(f"# guarded sampling benchmark: digits:subset={args.n}, {args.samples} samples, {args.sampler} {args.steps} steps, "
          f"s={config.scale}, alpha={config.alpha}, guard t < {config.max_timestep}, seed {args.seed}, {args.threads} threads")
    print(f"train: denoiser {t_unet:.0f} s ({MEMORIZE_PRESET.total_steps(len(members))} steps), guard {t_guard:.0f} s "
          f"({config.train_config().total_steps(len(members))} steps); feature net held-out accuracy {net.heldout_accuracy:.3f}")
    print("guard accuracy by t, members: " + ", ".join(f"t={t}: {a:.3f}" for t, a in acc_members.items()))
    print("guard accuracy by t, held-out: " + ", ".join(f"t={t}: {a:.3f}" for t, a in acc_heldout.items()))
    print(f"{'metric':<32}{'unguarded':>12}{'guarded':>12}{'ratio':>9}")
    for key in rows["unguarded"]:
        a, b = rows["unguarded"][key], rows["guarded"][key]
        ratio = f"{b / a:.3f}" if a else "-"
        print(f"{key:<32}{a:>12.4f}{b:>12.4f}{ratio:>9}")
    print(f"total {time.perf_counter() - clock:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "guard_accuracy_members": acc_members, "guard_accuracy_heldout": acc_heldout, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
