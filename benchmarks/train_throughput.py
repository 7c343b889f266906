"""Training throughput: dataward's trainer vs a plain diffusers training loop, same UNet, batch and threads (issue 2).

Figures: BENCHMARKS.md, section "Training throughput (issue 2)".

    python benchmarks/train_throughput.py [--rounds 8] [--steps 10] [--batch 128] [--threads 2] [--quick] [--json out.json]

Variants, all on the ``tiny`` preset (``dataward.models.nets.build_unet``, same seed), the digits training split, batch 128:

- ``dataward``: ``dataward.training.loop.run_steps`` with ``TrainState.fresh`` and ``denoiser_loss`` (as shipped: Adam and
  EMA with ``foreach=False``, per-example loss then mean, finiteness check, EMA step after every Adam step).
- ``plain``: a minimal diffusers loop (``DDPMScheduler.add_noise``, ``F.mse_loss``, ``torch.optim.Adam`` with torch's
  default settings) and NO EMA.
- ``plain+ema``: the same loop plus ``diffusers.training_utils.EMAModel`` (default settings) stepped after every Adam
  step: the fair comparison, since dataward keeps an EMA too.
- ``dataward-foreach``: ``run_steps`` with a ``TrainState`` whose Adam and EMA use ``foreach=True`` (an experiment
  for a possible fix; dataward's src is not changed).

Every round runs ``--steps`` optimizer steps of every variant, one after the other, in a rotated order (so a load
change on the shared machine hits all variants alike). The figure is the ratio of total steps/s, and the median of the
per-round ratios; both are printed with ``uptime``'s load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import dataward  # noqa: E402,F401  (before torch: its CPU settings, see dataward.openmp and dataward.numerics)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant before the rounds")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds x 2 steps")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 2, 1
    torch.set_num_threads(args.threads)

    from diffusers.training_utils import EMAModel

    from dataward.config import TrainConfig
    from dataward.data import load_source
    from dataward.models.nets import build_unet
    from dataward.diffusion.sampling import make_training_scheduler
    from dataward.training.loop import TrainState, denoiser_loss, run_steps

    data = load_source("digits")
    scheduler = make_training_scheduler()
    config = TrainConfig(batch_size=args.batch, threads=args.threads)

    def unet():
        return build_unet("tiny", 8, 1, 10, seed=0)

    # dataward, as shipped
    dw_state = TrainState.fresh(unet(), config)
    dw_gen = torch.Generator().manual_seed(0)
    dw_loss = denoiser_loss(scheduler)

    # dataward's run_steps with foreach Adam and EMA (experiment)
    fe_model = unet()
    fe_state = TrainState(fe_model, EMAModel(fe_model.parameters(), decay=config.ema_decay, foreach=True),
                          torch.optim.Adam(fe_model.parameters(), lr=config.lr, foreach=True), 0)
    fe_gen = torch.Generator().manual_seed(0)

    # plain diffusers loops
    class Plain:
        def __init__(self, ema: bool):
            self.model = unet()
            self.model.train()
            self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr)
            self.ema = EMAModel(self.model.parameters(), decay=config.ema_decay) if ema else None
            self.gen = torch.Generator().manual_seed(0)
            self.order = torch.empty(0, dtype=torch.long)

        def steps(self, n: int) -> None:
            images, labels = data.images, data.labels
            for _ in range(n):
                if len(self.order) < args.batch:
                    self.order = torch.cat([self.order, torch.randperm(len(images), generator=self.gen)])
                rows, self.order = self.order[: args.batch], self.order[args.batch:]
                x0, y = images[rows], labels[rows]
                noise = torch.randn(x0.shape, generator=self.gen)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=self.gen)
                pred = self.model(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample
                loss = F.mse_loss(pred, noise)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                if self.ema is not None:
                    self.ema.step(self.model.parameters())

    plain, plain_ema = Plain(ema=False), Plain(ema=True)
    variants = {
        "dataward": lambda n: run_steps(dw_state, data, dw_loss, n, config, dw_gen),
        "plain": plain.steps,
        "plain+ema": plain_ema.steps,
        "dataward-foreach": lambda n: run_steps(fe_state, data, dw_loss, n, config, fe_gen),
    }
    names = list(variants)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{sum(p.numel() for p in dw_state.model.parameters()):,} parameters, {len(data)} training images")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average before: {load_avg()}")
    for name in names:
        variants[name](args.warmup)
    seconds = {name: [] for name in names}
    cpu = {name: 0.0 for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            variants[name](args.steps)
            seconds[name].append(time.perf_counter() - t0)
            cpu[name] += time.process_time() - c0
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {args.steps / seconds[n][-1]:.2f} steps/s" for n in names)
              + f"  (load {load_avg()})", flush=True)
    total = {n: args.steps * args.rounds / sum(seconds[n]) for n in names}
    result = {"load_after": load_avg(), "steps_per_s": total, "rounds": args.rounds, "steps_per_round": args.steps,
              "batch": args.batch, "threads": args.threads, "ratios": {}}
    result["cpu_seconds_per_step"] = {n: cpu[n] / (args.steps * args.rounds) for n in names}
    print("\nsteps/s over all rounds: " + ", ".join(f"{n} {v:.3f}" for n, v in total.items()))
    print("CPU seconds per step (process time, both threads): " + ", ".join(f"{n} {v:.4f}" for n, v in result["cpu_seconds_per_step"].items()))
    for base in ("plain", "plain+ema"):
        for n in ("dataward", "dataward-foreach"):
            per_round = [seconds[base][i] / seconds[n][i] for i in range(args.rounds)]
            ratio, med = total[n] / total[base], statistics.median(per_round)
            result["ratios"][f"{n}/{base}"] = {"total": ratio, "median_per_round": med, "min": min(per_round), "max": max(per_round)}
            cpu_ratio = cpu[base] / cpu[n]
            result["ratios"][f"{n}/{base}"]["cpu"] = cpu_ratio
            print(f"throughput {n} / {base}: {ratio:.4f} (median of rounds {med:.4f}, range {min(per_round):.4f}-{max(per_round):.4f}; "
                  f"by CPU time {cpu_ratio:.4f})")
    print(f"load average after: {result['load_after']}")
    print("\n| ratio | total steps/s | median of per-round ratios (range) | by CPU time |\n|---|---|---|---|")
    for key, r in result["ratios"].items():
        n, base = key.split("/", 1)
        print(f"| {n} / {base} | {r['total']:.4f} ({total[n]:.3f} / {total[base]:.3f} steps/s) "
              f"| {r['median_per_round']:.4f} ({r['min']:.4f}-{r['max']:.4f}) | {r['cpu']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
