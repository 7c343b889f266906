"""Sampling cost (issue 4): composed K=8 sampling time / single-model sampling time; FD of top-k vs the full mixture.

Figures: BENCHMARKS.md, section "Compartments from scratch: sampling cost (issue 4)".

    python benchmarks/sampling_cost.py --workdir DIR [--epochs E] [--slices R] [--n 250] [--sample-steps 25]
                                       [--time-n 100] [--time-steps 10] [--rounds 3] [--quick] [--json out.json]

Uses the wards cached by compartments_quality.py in ``--workdir`` (``k1`` paragon and ``k8``; trained if missing).
Configurations: the paragon ("single", DDIM and DDPM), and K=8 with ``router`` weights (DDIM) and ``density`` weights
(DDPM, which density needs), each full mixture, top-1 and top-2. Models are loaded before any clock starts.

- Time ratio: ``--rounds`` rounds; in each, every configuration samples ``--time-n`` images with ``--time-steps`` steps,
  in a rotated order (load changes hit all alike). Ratio = total time of a K=8 configuration / total time of the single
  model with the same sampler. Goal <= 1.5 with top-k.
- FD: one run per configuration with ``--n`` samples, ``--sample-steps`` steps, seed 0, audit feature net vs held-out
  digits. Goal: top-k within 2% of the full mixture (same weights).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import dataward  # noqa: E402,F401  (before torch: its CPU settings, see dataward.openmp and dataward.numerics)

import torch  # noqa: E402

from compartments_quality import fd_of, get_ward, load_avg  # noqa: E402  (same folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--n", type=int, default=250)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--time-n", type=int, default=100)
    parser.add_argument("--time-steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: E=0.5, K=4, 40 samples, 5 steps, 1 round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    k = 8
    if args.quick:
        args.epochs, args.n, args.sample_steps, args.time_n, args.time_steps, args.rounds, k = 0.5, 40, 5, 20, 3, 1, 4
    torch.set_num_threads(args.threads)
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, threads {args.threads}, load {load_avg()}", flush=True)
    single, _ = get_ward(args.workdir, "k1", compartments=1, slices=1, epochs=args.epochs, router=False, threads=args.threads)
    composed, _ = get_ward(args.workdir, f"k{k}", compartments=k, slices=args.slices, epochs=args.epochs, router=True, threads=args.threads,
                        router_epochs=0.5 if args.quick else 30.0)
    torch.set_num_threads(args.threads)

    configs = {
        "single/ddim": (single, None, "ddim", None),
        "single/ddpm": (single, None, "ddpm", None),
    }
    for weights, sampler in (("router", "ddim"), ("density", "ddpm")):
        for top_k in (None, 1, 2):
            configs[f"K={k} {weights} {'full' if top_k is None else f'top-{top_k}'}"] = (composed, weights, sampler, top_k)

    def run(name, n, steps):
        ward, weights, sampler, top_k = configs[name]
        t0 = time.perf_counter()
        result = ward.sample(n, seed=0, steps=steps, sampler=sampler, weights=weights, top_k=top_k)
        return time.perf_counter() - t0, result

    names = list(configs)
    for name in names:  # load every model, warm up
        run(name, 4, 2)
    seconds = {name: 0.0 for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds[name] += run(name, args.time_n, args.time_steps)[0]
        print(f"timing round {r + 1}/{args.rounds} done (load {load_avg()})", flush=True)
    out: dict = {"k": k, "time_n": args.time_n, "time_steps": args.time_steps, "rounds": args.rounds, "n": args.n,
                 "sample_steps": args.sample_steps, "seconds": seconds, "time_ratio": {}, "fd": {}, "fd_ratio": {}}
    for name in names:
        if name.startswith("single"):
            continue
        sampler = configs[name][2]
        out["time_ratio"][name] = seconds[name] / seconds[f"single/{sampler}"]

    for name in names:
        s, result = run(name, args.n, args.sample_steps)
        out["fd"][name] = {"fd": fd_of(result.images), "seconds": s, "load": load_avg()}
        print(f"{name:>22}: FD {out['fd'][name]['fd']:.4f} ({s:.1f} s for n={args.n}, load {load_avg()})", flush=True)
    print()
    for name in names:
        if name.startswith("single"):
            continue
        sampler = configs[name][2]
        full = name.rsplit(" ", 1)[0] + " full"
        line = f"{name:>22} ({sampler}): time / single = {seconds[name]:.1f} / {seconds[f'single/{sampler}']:.1f} s = {out['time_ratio'][name]:.4f}"
        if "top" in name:
            fd_ratio = out["fd"][name]["fd"] / out["fd"][full]["fd"]
            out["fd_ratio"][name] = fd_ratio
            line += (f"; FD / full = {fd_ratio:.4f} (goals: time <= 1.5 {'met' if out['time_ratio'][name] <= 1.5 else 'NOT met'}, "
                     f"FD within 2% {'met' if abs(fd_ratio - 1) <= 0.02 else 'NOT met'})")
        print(line)
    print(f"\n| K = {k} sampling (n = {args.time_n} x {args.time_steps} steps, {args.rounds} rounds) | time / single (same sampler) "
          f"| FD (n = {args.n}) | FD / full |\n|---|---|---|---|")
    for name in out["time_ratio"]:
        fd_ratio = f"{out['fd_ratio'][name]:.4f}" if name in out["fd_ratio"] else "1"
        print(f"| {name} | {out['time_ratio'][name]:.4f} | {out['fd'][name]['fd']:.4f} | {fd_ratio} |")
    print(f"load average after: {load_avg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
