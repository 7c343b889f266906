"""Compartments quality (issue 4): Fréchet distance of composed K=4 / K=8 wards over the K=1 paragon, equal total compute.

Figures: BENCHMARKS.md, section "Compartments from scratch: quality (issue 4)".

    python benchmarks/compartments_quality.py --workdir DIR [--epochs E] [--slices R] [--n 250] [--sample-steps 25] [--quick]

Wards (cached in ``--workdir`` and reused by forgetting_cost.py and sampling_cost.py; a ward is trained once, its training
wall time stored next to it in ``<name>.train.json``):

- ``k1``: the paragon, one compartment, ``slices=1``, ``TrainConfig(epochs=E)``;
- ``k4``, ``k8``: ``compartments=K``, random assignment, ``slices=R`` (default 4, so the same K=8 ward serves the
  forgetting figure), ``TrainConfig(epochs=E)`` per compartment, router on (default router config: 30 epochs).

Equal compute: each compartment gets E epochs over its own data, so the denoisers' total optimizer steps are equal
(up to per-compartment rounding; printed). The router's training is extra compute on top, reported separately.

FD: audit feature net (``digits_feature_net``) features of ``--n`` conditional samples (labels drawn by the ward, seed 0)
vs the 297 held-out digits. ``density`` weights need the stochastic sampler, so each composed FD is divided by the
paragon's FD with the same sampler: router (DDIM) / paragon (DDIM), density (DDPM) / paragon (DDPM).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import dataward  # noqa: E402,F401  (before torch: its CPU settings, see dataward.openmp and dataward.numerics)

import torch  # noqa: E402


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def get_ward(workdir: Path, name: str, *, compartments: int, slices: int, epochs: float, router: bool, threads: int = 2,
             router_epochs: float = 30.0):
    """Open the cached ward ``workdir/name`` or create and train it; returns (ward, info with training seconds)."""
    from dataward.config import TrainConfig
    from dataward.ward import Ward

    path, info_path = workdir / name, workdir / f"{name}.train.json"
    want = {"compartments": compartments, "slices": slices, "epochs": epochs, "router": router, "threads": threads,
            "router_epochs": router_epochs}
    if path.is_dir() and info_path.is_file():
        info = json.loads(info_path.read_text())
        ward = Ward.open(path)
        if all(info.get(k) == v for k, v in want.items()) and not ward.models_missing():
            return ward, info
        raise SystemExit(f"{path} exists but does not match {want} (or is not fully trained): delete it or use another --workdir")
    if path.exists():
        raise SystemExit(f"{path} exists without {info_path.name}: delete it")
    ward = Ward.create(path, "digits", compartments=compartments, slices=slices, router=router,
                       train=TrainConfig(epochs=epochs, threads=threads),
                       router_train=TrainConfig(epochs=router_epochs, lr=1e-3, threads=threads))  # the default router config at 30
    load_before = load_avg()
    t0, c0 = time.perf_counter(), time.process_time()
    ward.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    records = {c: ward.served()[c] for c in ward.compartments()}
    router_record = ward.served("router").get(None)
    info = want | {
        "train_seconds": seconds, "train_cpu_seconds": cpu, "load_before": load_before, "load_after": load_avg(),
        "denoiser_steps": {str(c): r.metadata["steps"] for c, r in records.items()},
        "router_steps": None if router_record is None else router_record.metadata["steps"],
        "samples_per_compartment": {str(c): len(ward.training_data(c)) for c in ward.compartments()},
    }
    info_path.write_text(json.dumps(info, indent=2))
    print(f"trained {name}: {seconds:.1f} s wall ({cpu:.1f} s CPU), denoiser steps {sum(info['denoiser_steps'].values())}, "
          f"router steps {info['router_steps']} (load {load_before} -> {info['load_after']})", flush=True)
    return ward, info


_FEATURES: dict = {}


def fd_of(images01: torch.Tensor) -> float:
    """FD of images in [0, 1] vs the held-out digits, with the audit feature net."""
    from dataward.audit.features import digits_feature_net
    from dataward.audit.metrics import frechet_distance
    from dataward.data import load_source

    if not _FEATURES:
        _FEATURES["net"] = net = digits_feature_net()
        _FEATURES["ref"] = net(load_source("digits:heldout").images)
    return frechet_distance(_FEATURES["net"](images01 * 2 - 1), _FEATURES["ref"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="cache folder for the trained wards (shared)")
    parser.add_argument("--epochs", type=float, default=20.0, help="E: epochs per compartment (all K)")
    parser.add_argument("--slices", type=int, default=4, help="R: SISA slices of the K=4 and K=8 wards")
    parser.add_argument("--n", type=int, default=250, help="samples per FD")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--ks", default="4,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: E=0.5, 40 samples, 5 sampling steps, K=4 only")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.n, args.sample_steps, args.ks = 0.5, 40, 5, "4"
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ks = [int(k) for k in args.ks.split(",")]
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, threads {args.threads}, E={args.epochs}, R={args.slices}, "
          f"n={args.n}, {args.sample_steps} sampling steps, load {load_avg()}", flush=True)

    wards = {1: get_ward(args.workdir, "k1", compartments=1, slices=1, epochs=args.epochs, router=False, threads=args.threads)}
    for k in ks:
        wards[k] = get_ward(args.workdir, f"k{k}", compartments=k, slices=args.slices, epochs=args.epochs, router=True, threads=args.threads,
                        router_epochs=0.5 if args.quick else 30.0)

    out: dict = {"epochs": args.epochs, "slices": args.slices, "n": args.n, "sample_steps": args.sample_steps, "train": {}, "fd": {}, "ratio": {}}
    for k, (ward, info) in wards.items():
        out["train"][k] = info
        torch.set_num_threads(args.threads)
        for sampler, weights in (("ddim", "router"), ("ddpm", "density")):
            if k == 1:
                key = f"k1/{sampler}"
            else:
                key = f"k{k}/{weights}"
            t0 = time.perf_counter()
            result = ward.sample(args.n, seed=0, steps=args.sample_steps, sampler=sampler, weights=None if k == 1 else weights)
            seconds = time.perf_counter() - t0
            out["fd"][key] = {"fd": fd_of(result.images), "seconds": seconds, "load": load_avg(), "mode": result.weights, "sampler": result.sampler}
            print(f"{key:>12}: FD {out['fd'][key]['fd']:.4f}  ({result.weights}, {result.sampler}, {seconds:.1f} s, load {load_avg()})", flush=True)
    print()
    for k in ks:
        for weights, sampler in (("router", "ddim"), ("density", "ddpm")):
            ratio = out["fd"][f"k{k}/{weights}"]["fd"] / out["fd"][f"k1/{sampler}"]["fd"]
            out["ratio"][f"k{k}/{weights}"] = ratio
            print(f"FD K={k} {weights:>7} / paragon ({sampler}): {ratio:.4f}  (goal <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")
    for k, (_, info) in wards.items():
        print(f"K={k}: denoiser steps {sum(info['denoiser_steps'].values())} total, router steps {info['router_steps']}, "
              f"training {info['train_seconds']:.1f} s wall")
    fd, arms = {key: value["fd"] for key, value in out["fd"].items()}, [(k, w) for k in ks for w in ("router", "density")]
    print("\n| E | paragon FD DDIM / DDPM | " + " | ".join(f"K = {k} {w} / paragon" for k, w in arms) + " |\n" + "|---" * (len(arms) + 2) + "|")
    print(f"| {args.epochs:g} | {fd['k1/ddim']:.4f} / {fd['k1/ddpm']:.4f} | "
          + " | ".join(f"{fd[f'k{k}/{w}']:.4f} -> **{out['ratio'][f'k{k}/{w}']:.4f}**" for k, w in arms) + " |")
    print(f"load average after: {load_avg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
