"""Threading defaults (issue 18): how long torch's OpenMP threads spin before sleeping, alone and beside busy processes.

Figures: BENCHMARKS.md, section "Threading defaults (issue 18)".

    python benchmarks/threading_defaults.py [--arms old,new,passive,spin10k] [--rounds 3] [--busy 2] [--steps 12]
                                            [--json out.json]

Each arm is a fresh Python process (libgomp reads its wait settings once, when torch loads it) that times one piece of
the demo's work with 2 intra-op threads: ``--steps`` training steps of the ``tiny`` UNet at batch 64 (the demo's
compartment budget) and 16 samples x 25 DDIM steps. Arms:

- ``old``: libgomp's own default (torch imported before dataward, no wait variable set: spin 300,000 times, then sleep)
- ``new``: what ``import dataward`` now selects (:mod:`dataward.openmp`)
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once)
- ``spinN``: ``GOMP_SPINCOUNT=N``, e.g. ``spin10k``

Conditions: ``alone`` (nothing else running) and ``busy`` (``--busy`` pure-Python busy loops, one per core: the "two
other CPU jobs" of a shared machine; ``--busy-kind torch``: each runs small torch matrix products on 2 threads with
libgomp's default waiting, like another team's job). Every round runs every arm in both conditions, arms in a rotated order. Printed:
seconds per arm and condition (median over rounds), busy / alone per arm (goal <= 2.5), and alone, new / old (goal
>= 0.95 in speed, i.e. time ratio <= 1.05). The load average is printed with every round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BUSY = {  # what a busy neighbour runs: a pure-Python loop, or another team's torch job (2 threads, libgomp's default waiting)
    "python": "while True: pass",
    "torch": "import torch; torch.set_num_threads(2); x = torch.randn(64, 64)\nwhile True: x = torch.tanh(x @ x)",
}


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def arm_environment(arm: str) -> dict[str, str]:
    """The environment of one arm's process: no wait variable of ours, then the arm's own."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    if arm == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif arm.startswith("spin"):
        env["GOMP_SPINCOUNT"] = str(int(float(arm[4:].replace("k", "e3").replace("m", "e6"))))
    return env


def work(arm: str, steps: int) -> dict:
    """In the arm's process: time the training steps and the sampling (after one untimed warm-up of each)."""
    given = {k: os.environ.get(k) for k in WAIT_VARIABLES}
    if arm == "old":
        import torch  # noqa: F401  (first: libgomp starts before dataward could choose its wait settings)
    import dataward  # noqa: F401  (selects the wait settings unless torch came first or the environment has its own)
    import torch

    libgomp_read = given if arm == "old" else {k: os.environ.get(k) for k in WAIT_VARIABLES}  # what libgomp started with

    from dataward.config import TrainConfig
    from dataward.data import load_source
    from dataward.diffusion.sampling import make_sampler, make_training_scheduler, sample_loop, unet_eps
    from dataward.models.nets import build_unet
    from dataward.training.loop import TrainState, denoiser_loss, run_steps

    torch.set_num_threads(2)
    data = load_source("digits:subset=400")
    config = TrainConfig(batch_size=64, threads=2)
    scheduler = make_training_scheduler()
    state = TrainState.fresh(build_unet("tiny", 8, 1, 10, seed=0), config)
    loss = denoiser_loss(scheduler)
    generator = torch.Generator().manual_seed(0)
    run_steps(state, data, loss, 2, config, generator)
    started = time.perf_counter()
    run_steps(state, data, loss, steps, config, generator)
    train_s = time.perf_counter() - started
    sampler = make_sampler(scheduler, "ddim")
    x_T = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 10
    sample_loop(unet_eps(state.model), x_T, sampler, steps=3, y=y)
    started = time.perf_counter()
    sample_loop(unet_eps(state.model), x_T, sampler, steps=25, y=y)
    sample_s = time.perf_counter() - started
    return {"train_s": train_s, "sample_s": sample_s, "wait": libgomp_read}


def run_arm(arm: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", arm, "--steps", str(steps)], env=arm_environment(arm),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="old,new,passive,spin10k")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="busy processes in the busy condition")
    parser.add_argument("--busy-kind", choices=sorted(BUSY), default="python", help="what each busy process runs")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per arm")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(work(args.worker, args.steps)))
        return
    arms = args.arms.split(",")
    times: dict[tuple[str, str], list[dict]] = {}
    print(f"load average before: {load_avg()}; busy neighbours: {args.busy} x {args.busy_kind}; {args.steps} training steps", flush=True)
    for r in range(args.rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for condition in ("alone", "busy"):
            busy = [subprocess.Popen([sys.executable, "-c", BUSY[args.busy_kind]], env=arm_environment("old")) for _ in range(args.busy if condition == "busy" else 0)]
            try:
                for arm in order:
                    result = run_arm(arm, args.steps)
                    times.setdefault((arm, condition), []).append(result)
                    print(f"round {r} {condition:5s} {arm:8s} train {result['train_s']:7.2f} s  sample {result['sample_s']:6.2f} s  "
                          f"load {load_avg()}  {result['wait']}", flush=True)
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
    summary = {}
    print("\narm       condition  train s (median)  sample s (median)  busy/alone train  busy/alone sample")
    for arm in arms:
        row = {}
        for condition in ("alone", "busy"):
            row[condition] = {part: statistics.median(t[part] for t in times[(arm, condition)]) for part in ("train_s", "sample_s")}
        row["busy_over_alone"] = {part: row["busy"][part] / row["alone"][part] for part in ("train_s", "sample_s")}
        summary[arm] = row
        for condition in ("alone", "busy"):
            ratio = row["busy_over_alone"] if condition == "busy" else None
            print(f"{arm:9s} {condition:9s}  {row[condition]['train_s']:16.3f}  {row[condition]['sample_s']:17.3f}"
                  + (f"  {ratio['train_s']:16.2f}  {ratio['sample_s']:17.2f}" if ratio else ""))
    if "old" in summary:
        for arm in arms:
            if arm != "old":
                speed = {part: summary["old"]["alone"][part] / summary[arm]["alone"][part] for part in ("train_s", "sample_s")}
                summary[arm]["alone_speed_over_old"] = speed
                print(f"alone, speed {arm} / old: train {speed['train_s']:.3f}, sample {speed['sample_s']:.3f}")
    print(f"load average after: {load_avg()}")
    print("\n| neighbours | arm | alone: train / sample s | busy: train / sample s | busy / alone: train, sample "
          "| alone, speed / old: train, sample |\n|---|---|---|---|---|---|")
    for i, arm in enumerate(arms):
        row, speed = summary[arm], summary[arm].get("alone_speed_over_old")
        speed_text = "" if speed is None else f"{speed['train_s']:.3f}, {speed['sample_s']:.3f}"
        print(f"| {f'{args.busy} x {args.busy_kind}' if i == 0 else ''} | {arm} | {row['alone']['train_s']:.3f} / {row['alone']['sample_s']:.3f} "
              f"| {row['busy']['train_s']:.3f} / {row['busy']['sample_s']:.3f} "
              f"| {row['busy_over_alone']['train_s']:.2f}, {row['busy_over_alone']['sample_s']:.2f} "
              f"| {speed_text} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "steps": args.steps, "busy": args.busy, "busy_kind": args.busy_kind, "arms": summary}, f, indent=2)


if __name__ == "__main__":
    main()
