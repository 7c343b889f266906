"""Compartments fine-tuned from a public base (issue 16): quality, sampling cost and forgetting of K = 8 vs the K = 1 paragon.

Figures: BENCHMARKS.md, section "Compartments fine-tuned from a public base (issue 16)".
Figures: BENCHMARKS.md, section "Forgetting from a public base (issue 16)".
Figures: BENCHMARKS.md, section "Sampling from a public base (issue 16)".

    python benchmarks/base_quality.py --workdir DIR [--epochs E] [--adapters full,lora:8] [--n 250] [--forgets 8] [--quick]

One public base (a denoiser trained on ``printed:count=3000`` at the ward's default public budget, 40 epochs) is trained
once and saved as a diffusers folder; every ward below imports it (``base=DIR``), so all start from the same bytes:

- ``scratch-k1``: the paragon of today (K = 1, no base), E epochs;
- ``<adapter>-k1``: the paragon from the base, E epochs;
- ``<adapter>-k8``: K = 8 compartments from the base (random assignment, R = 4 SISA slices, router on), E epochs each
  (equal epochs per example: equal total compute, up to rounding; printed).

FD: audit feature net features of ``--n`` conditional samples (seed 0, 25 steps) vs the 297 held-out digits; each K = 8
FD is divided by the paragon's with the same sampler (density: DDPM; router and soup: DDIM). CAS: logistic regression
on the samples' pixels, tested on the held-out digits. Sampling time: ``--time-n`` samples x 10 steps, 3 rounds in
rotated order, models loaded before the clock. Forgetting: ``--forgets`` random IDs, each forgotten (retraining included)
in a scratch copy of the K = 8 ward with the router turned off (density weights need none; with it a forget also
retrains the joint router on all data), over the paragon's training time; FD after the first forget (density).
Wards are cached in ``--workdir`` (training seconds in ``<name>.train.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

SLICES = 4


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def train_base(workdir: Path, quick: bool) -> Path:
    """The public base, trained once by a ward on printed digits and saved as a UNet2DModel folder."""
    from dataward.config import TrainConfig
    from dataward.ward import Ward

    folder = workdir / "base-unet"
    if (folder / "config.json").is_file():
        return folder
    shutil.rmtree(workdir / "base-ward", ignore_errors=True)
    ward = Ward.create(workdir / "base-ward", "digits", base="printed:count=300" if quick else "printed:count=3000")
    if quick:
        ward.reconfigure(public_train=TrainConfig(epochs=1.0))
    t0 = time.perf_counter()
    ward.train(only=("public-denoiser",))
    print(f"trained the base in {time.perf_counter() - t0:.1f} s (load {load_avg()})", flush=True)
    ward.model(ward.served("public-denoiser")[None]).save_pretrained(str(folder), safe_serialization=True)
    return folder


def get_ward(workdir: Path, name: str, base: Path | None, adapter: str, compartments: int, epochs: float, quick: bool):
    """Open the cached ward or create and train it; returns (ward, info)."""
    from dataward.config import TrainConfig
    from dataward.ward import Ward

    path, info_path = workdir / name, workdir / f"{name}.train.json"
    if path.is_dir() and info_path.is_file():
        return Ward.open(path), json.loads(info_path.read_text())
    shutil.rmtree(path, ignore_errors=True)
    slices = 1 if compartments == 1 else SLICES
    ward = Ward.create(path, "digits", compartments=compartments, slices=slices, router=compartments > 1, base=None if base is None else str(base),
                       adapter=adapter, train=TrainConfig(epochs=epochs),
                       router_train=TrainConfig(epochs=0.5 if quick else 30.0, lr=1e-3))
    load_before, t0 = load_avg(), time.perf_counter()
    ward.train()
    seconds = time.perf_counter() - t0
    served = ward.served()
    info = {"name": name, "adapter": adapter, "compartments": compartments, "slices": slices, "epochs": epochs, "train_seconds": seconds,
            "load": f"{load_before} -> {load_avg()}", "denoiser_steps": sum(r.metadata["steps"] for r in served.values()),
            "bytes_per_compartment": _bytes(ward, served)}
    info_path.write_text(json.dumps(info, indent=2))
    print(f"trained {name}: {seconds:.1f} s, {info['denoiser_steps']} denoiser steps (load {info['load']})", flush=True)
    return ward, info


def _bytes(ward, served) -> float:
    """Mean bytes on disk of a compartment's served checkpoint folder (weights and training state)."""
    sizes = [sum(f.stat().st_size for f in (ward.path / r.path).iterdir()) for r in served.values()]
    return sum(sizes) / len(sizes)


_FEATURES: dict = {}


def quality(images01: torch.Tensor, labels: torch.Tensor) -> dict:
    """FD vs the held-out digits (audit feature net) and CAS (pixels) of class-conditional samples."""
    from dataward.audit.features import digits_feature_net
    from dataward.audit.metrics import downstream_accuracy, frechet_distance
    from dataward.data import load_source

    if not _FEATURES:
        _FEATURES["net"] = net = digits_feature_net()
        _FEATURES["heldout"] = heldout = load_source("digits:heldout")
        _FEATURES["ref"] = net(heldout.images)
    images = images01 * 2 - 1
    heldout = _FEATURES["heldout"]
    return {"fd": frechet_distance(_FEATURES["net"](images), _FEATURES["ref"]),
            "cas": downstream_accuracy(images, labels, heldout.images, heldout.labels, seed=0)}


MODES = {"k1": (("ddim", None), ("ddpm", None)), "k8": (("ddpm", "density"), ("ddim", "router"), ("ddim", "soup"))}


def measure_quality(ward, name: str, n: int, steps: int, out: dict) -> None:
    for sampler, weights in MODES["k1" if len(ward.compartments()) == 1 else "k8"]:
        result = ward.sample(n, seed=0, steps=steps, sampler=sampler, weights=weights)
        key = f"{name}/{weights or sampler}"
        out[key] = quality(result.images, result.labels) | {"sampler": sampler, "seconds": result.seconds}
        print(f"{key:>22}: FD {out[key]['fd']:.4f}  CAS {out[key]['cas']:.4f}  ({sampler}, {result.seconds:.1f} s, load {load_avg()})", flush=True)


def base_alone(folder: Path, n: int, steps: int) -> dict:
    """FD and CAS of the base sampled alone (DDIM, labels uniform over the 10 classes, seed 0)."""
    from dataward.public_base import load_unet_folder
    from dataward.diffusion.sampling import make_sampler, make_training_scheduler, sample_loop, unet_eps

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=generator)
    x_T = torch.randn((n, 1, 8, 8), generator=generator)
    x0 = sample_loop(unet_eps(load_unet_folder(folder).eval()), x_T, make_sampler(make_training_scheduler(), "ddim"), steps=steps, y=labels,
                     generator=generator)
    return quality((x0.clamp(-1, 1) + 1) / 2, labels)


def measure_sampling(single, composed, n: int) -> dict:
    """Seconds of n x 10-step sampling per configuration, 3 rounds in rotated order (models loaded first); mixtures with
    the batched evaluation (one vectorized call per step) and with the per-compartment loop."""
    configs = {"single": (single, "ddim", None, None, True), "soup": (composed, "ddim", "soup", None, True)}
    for weights, sampler in (("density", "ddpm"), ("router", "ddim")):
        for top_k in (1, None):
            for batched in (True, False):
                name = f"{weights} {'top-1' if top_k else 'full'} ({'batched' if batched else 'loop'})"
                configs[name] = (composed, sampler, weights, top_k, batched)
    for ward, sampler, weights, top_k, batched in configs.values():  # load (and make the soup and stack) before the clock
        ward.sample(2, steps=1, sampler=sampler, weights=weights, top_k=top_k, batched=batched)
    seconds = {name: 0.0 for name in configs}
    names = list(configs)
    for r in range(3):
        for name in names[r % len(names):] + names[:r % len(names)]:
            ward, sampler, weights, top_k, batched = configs[name]
            t0 = time.perf_counter()
            ward.sample(n, seed=r, steps=10, sampler=sampler, weights=weights, top_k=top_k, batched=batched)
            seconds[name] += time.perf_counter() - t0
    return seconds


def measure_forgetting(ward, paragon_seconds: float, forgets: int, n: int, steps: int) -> dict:
    from dataward.ward import Ward

    ids = sorted(random.Random(0).sample(list(ward.training_data().ids), forgets))
    rows, walls, fd_after = ward.ledger.sample_rows(ids), [], None
    for i, sample_id in enumerate(ids):
        with tempfile.TemporaryDirectory(prefix="dw-forget-") as tmp:
            copy = Path(tmp) / "w"
            shutil.copytree(ward.path, copy)
            scratch = Ward.open(copy)
            scratch.reconfigure(router=False)  # density weights (compartment-pure): a forget retrains one compartment only
            t0 = time.perf_counter()
            scratch.forget([sample_id])
            walls.append(time.perf_counter() - t0)
            print(f"  forget {sample_id} (compartment {rows[sample_id][0]}, slice {rows[sample_id][1]}): {walls[-1]:.1f} s", flush=True)
            if i == 0:
                result = scratch.sample(n, seed=0, steps=steps, sampler="ddpm", weights="density")
                fd_after = quality(result.images, result.labels)["fd"]
            scratch.close()
    mean = sum(walls) / len(walls)
    return {"ids": ids, "walls": walls, "mean_seconds": mean, "ratio": mean / paragon_seconds, "fd_after_first": fd_after}


def print_tables(out: dict, tags: list[str]) -> None:
    """The rows of this run's tables in BENCHMARKS.md (quality, forgetting, sampling), one column per adapter."""
    q, forgetting, sampling = out["quality"], out["forgetting"], out["sampling"]

    def table(first: str, rows: list[tuple[str, list[str], str]]) -> None:
        print(f"\n| {first} | " + " | ".join(tags) + " | goal |\n" + "|---" * (len(tags) + 2) + "|")
        for label, cells, goal in rows:
            print(f"| {label} | " + " | ".join(cells) + f" | {goal} |")

    def fd(key: str) -> float:
        return q[key]["fd"]

    if q:
        rows = [(f"FD(K = 8 {w}) / FD(K = 1 paragon)", [f"{fd(f'{t}-k8/{w}') / fd(f'{t}-k1/{s}'):.4f}" for t in tags], "<= 1.05")
                for w, s in (("density", "ddpm"), ("router", "ddim"), ("soup", "ddim"))]
        gain = [f"{fd(f'{t}-k8/density') / fd('scratch-k1/ddpm'):.4f}" for t in tags]
        table(f"ratio (E = {out['epochs']:g})", rows + [("FD(K = 8 density) / FD(K = 1 from scratch)", gain, "")])
    if forgetting:
        paragon = {t: out["train"][f"{t}-k1"]["train_seconds"] for t in tags}
        walls = [f"{forgetting[t]['ratio']:.4f} ({forgetting[t]['mean_seconds']:.1f} s / {paragon[t]:.1f} s)" for t in tags]
        after = [f"{100 * (forgetting[t]['fd_after_first'] / fd(f'{t}-k8/density') - 1):+.2f}%" if q else "not measured"
                 for t in tags]
        count = len(forgetting[tags[0]]["walls"])
        table("ratio", [(f"forget one ID (mean of {count}) / paragon training", walls, "<= 0.1"),
                        ("FD density after the first forget", after, "within 1%")])
    if sampling:
        names = [name for name in sampling[tags[0]] if name != "single_seconds"]
        goal = {name: "<= 1.1" if name == "soup" else "<= 1.5" if "top-1" in name else "" for name in names}
        table("configuration (K = 8 time / single)", [(name, [f"{sampling[t][name]:.3f}" for t in tags], goal[name]) for name in names])


def main() -> None:  # long: one run of every arm, printing each figure as it is measured
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--epochs", type=float, default=200.0)
    parser.add_argument("--adapters", default="full")
    parser.add_argument("--n", type=int, default=250)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--time-n", type=int, default=100)
    parser.add_argument("--forgets", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--figures", default="quality,sampling,forgetting", help="which figures to measure (wards are cached)")
    parser.add_argument("--quick", action="store_true", help="smoke run: E=0.5, a 1-epoch base on 300 images, 40 samples")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.n, args.sample_steps, args.time_n, args.forgets = 0.5, 40, 5, 20, 1
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"E={args.epochs}, n={args.n}, {args.sample_steps} sampling steps, threads {args.threads}, load {load_avg()}", flush=True)
    base = train_base(args.workdir, args.quick)
    out: dict = {"epochs": args.epochs, "quality": {}, "train": {}, "sampling": {}, "forgetting": {}}
    figures = set(args.figures.split(","))
    scratch, info = get_ward(args.workdir, "scratch-k1", None, "full", 1, args.epochs, args.quick)
    out["train"]["scratch-k1"] = info
    if "quality" in figures:
        out["quality"]["base"] = base_alone(base, args.n, args.sample_steps)
        print(f"{'base alone':>22}: FD {out['quality']['base']['fd']:.4f}  CAS {out['quality']['base']['cas']:.4f}  (ddim)", flush=True)
        measure_quality(scratch, "scratch-k1", args.n, args.sample_steps, out["quality"])
    for adapter in args.adapters.split(","):
        tag = adapter.replace(":", "")
        paragon, info1 = get_ward(args.workdir, f"{tag}-k1", base, adapter, 1, args.epochs, args.quick)
        composed, info8 = get_ward(args.workdir, f"{tag}-k8", base, adapter, 8, args.epochs, args.quick)
        out["train"] |= {f"{tag}-k1": info1, f"{tag}-k8": info8}
        print(f"{tag} storage per compartment: {info8['bytes_per_compartment'] / 1e6:.2f} MB (weights or adapter + training state)", flush=True)
        q = out["quality"]
        if "quality" in figures:
            measure_quality(paragon, f"{tag}-k1", args.n, args.sample_steps, q)
            measure_quality(composed, f"{tag}-k8", args.n, args.sample_steps, q)
        for weights, sampler in (("density", "ddpm"), ("router", "ddim"), ("soup", "ddim")) if "quality" in figures else ():
            ratio = q[f"{tag}-k8/{weights}"]["fd"] / q[f"{tag}-k1/{sampler}"]["fd"]
            gain = q[f"{tag}-k8/{weights}"]["fd"] / q[f"scratch-k1/{sampler}"]["fd"]
            print(f"{tag}: FD(K=8 {weights}) / FD(K=1 paragon, {sampler}) = {ratio:.4f} (goal <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'}); "
                  f"/ FD(K=1 from scratch) = {gain:.4f}", flush=True)
        if "sampling" in figures:
            seconds = measure_sampling(paragon, composed, args.time_n)
            out["sampling"][tag] = {name: s / seconds["single"] for name, s in seconds.items()} | {"single_seconds": seconds["single"]}
            print(f"{tag} sampling time / single ({seconds['single']:.2f} s for 3 rounds, load {load_avg()}): "
                  + ", ".join(f"{name} {s / seconds['single']:.3f}" for name, s in seconds.items()), flush=True)
        if "forgetting" in figures:
            forgetting = measure_forgetting(composed, info1["train_seconds"], args.forgets, args.n, args.sample_steps)
            out["forgetting"][tag] = forgetting
            before = q.get(f"{tag}-k8/density", {}).get("fd", float("nan"))
            print(f"{tag} forgetting: mean {forgetting['mean_seconds']:.1f} s over {args.forgets} IDs / paragon training {info1['train_seconds']:.1f} s = "
                  f"{forgetting['ratio']:.4f} (goal <= 0.1); FD density before {before:.4f} -> after {forgetting['fd_after_first']:.4f} "
                  f"({100 * (forgetting['fd_after_first'] / before - 1):+.2f}%)", flush=True)
    print_tables(out, [adapter.replace(":", "") for adapter in args.adapters.split(",")])
    print(f"load average after: {load_avg()}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
