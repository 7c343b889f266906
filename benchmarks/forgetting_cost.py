"""Forgetting cost (issue 4): wall time of ``ward.forget([id])`` (retraining included) / wall time to train the paragon.

Figures: BENCHMARKS.md, section "Compartments from scratch: forgetting cost (issue 4)".

    python benchmarks/forgetting_cost.py --workdir DIR [--epochs E] [--slices R] [--n 250] [--sample-steps 25]
                                         [--batch 5] [--reuse-paragon-time] [--quick] [--json out.json]

Uses the wards cached by compartments_quality.py in ``--workdir`` (``k1`` paragon, ``k8``: K=8, R slices, router on;
trained here if missing) and makes ``k16`` (K=16, R slices, no router). Every forget runs on a scratch copy of a
cached ward, so the cache stays as trained. Cases:

- K=8 ``density`` (no router): the copy's ward.json gets ``router: false`` — its denoisers are the ones a ward
  created with the router off holds (compartment purity: same IDs, seed, config), so only the compartment retrains;
- K=8 ``router``: the compartment and the joint router retrain;
- K=16, no router: one ID;
- K=8, no router, ``--batch`` IDs forgotten in ONE ``forget`` call.

The paragon's training time is measured in the same run (a fresh K=1 ward trained with the same E, in a scratch
folder) unless ``--reuse-paragon-time`` takes it from ``k1.train.json``. The forgotten IDs are drawn with a seeded
generator from the ward's live IDs; their compartment and slice are printed (the slice decides how much retrains).
FD before / after: audit feature net, ``--n`` conditional samples, seed 0, vs held-out digits (density: DDPM;
router: DDIM), before = the cached ward, after = the copy after forgetting.
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

import dataward  # noqa: E402,F401  (before torch: its CPU settings, see dataward.openmp and dataward.numerics)

import torch  # noqa: E402

from compartments_quality import fd_of, get_ward, load_avg  # noqa: E402  (same folder)


def copy_ward(src: Path, dst: Path, router: bool | None = None):
    from dataward.ward import Ward

    shutil.copytree(src, dst)
    if router is not None:
        config = json.loads((dst / "ward.json").read_text())
        config["router"] = router
        (dst / "ward.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return Ward.open(dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--epochs", type=float, default=20.0)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--n", type=int, default=250)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=5, help="IDs forgotten in one call for the batched case")
    parser.add_argument("--k16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--reuse-paragon-time", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke run: E=0.5, 40 samples, 5 sampling steps, K=4 instead of 8, no K=16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    k_main = 8
    if args.quick:
        args.epochs, args.n, args.sample_steps, k_main, args.k16 = 0.5, 40, 5, 4, False
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, threads {args.threads}, E={args.epochs}, R={args.slices}, "
          f"load {load_avg()}", flush=True)
    paragon, paragon_info = get_ward(args.workdir, "k1", compartments=1, slices=1, epochs=args.epochs, router=False, threads=args.threads)
    main_ward, _ = get_ward(args.workdir, f"k{k_main}", compartments=k_main, slices=args.slices, epochs=args.epochs, router=True, threads=args.threads,
                        router_epochs=0.5 if args.quick else 30.0)
    k16 = get_ward(args.workdir, "k16", compartments=16, slices=args.slices, epochs=args.epochs, router=False, threads=args.threads)[0] if args.k16 else None
    rng = random.Random(args.seed)
    out: dict = {"epochs": args.epochs, "slices": args.slices, "cases": {}}

    with tempfile.TemporaryDirectory(prefix="dataward-forget-", dir=args.workdir) as scratch:
        scratch = Path(scratch)
        if args.reuse_paragon_time:
            paragon_s = paragon_info["train_seconds"]
            print(f"paragon training time from {args.workdir / 'k1.train.json'}: {paragon_s:.1f} s (NOT measured in this run)")
        else:
            from dataward.config import TrainConfig
            from dataward.ward import Ward

            fresh = Ward.create(scratch / "paragon", "digits", train=TrainConfig(epochs=args.epochs, threads=args.threads))
            t0 = time.perf_counter()
            fresh.train()
            paragon_s = time.perf_counter() - t0
            print(f"paragon (K=1) trained in this run: {paragon_s:.1f} s (load {load_avg()})", flush=True)
        out["paragon_seconds"] = paragon_s
        out["paragon_seconds_measured_in_run"] = not args.reuse_paragon_time

        def pick(ward, count):
            live = sorted(ward.training_data().ids)
            ids = rng.sample(live, count)
            rows = ward.ledger.sample_rows(ids)
            return ids, [{"id": i, "compartment": rows[i][0], "slice": rows[i][1]} for i in ids]

        def fd(ward, weights, sampler):
            torch.set_num_threads(args.threads)
            result = ward.sample(args.n, seed=0, steps=args.sample_steps, sampler=sampler, weights=weights)
            return fd_of(result.images)

        cases = [
            ("K=%d density (no router), 1 ID" % k_main, main_ward, False, 1, "density", "ddpm"),
            ("K=%d router, 1 ID" % k_main, main_ward, True, 1, "router", "ddim"),
            ("K=%d density (no router), %d IDs in one call" % (k_main, args.batch), main_ward, False, args.batch, None, None),
        ]
        if k16 is not None:
            cases.append(("K=16 density (no router), 1 ID", k16, None, 1, None, None))
        fd_before: dict = {}
        for index, (name, ward, router, count, weights, sampler) in enumerate(cases):
            copy = copy_ward(ward.path, scratch / f"case{index}", router)
            ids, where = pick(copy, count)
            load_before = load_avg()
            t0 = time.perf_counter()
            result = copy.forget(ids)
            seconds = time.perf_counter() - t0
            case = {"ids": where, "seconds": seconds, "ratio": seconds / paragon_s, "state": result.state,
                    "retrain_seconds": result.retrain_seconds, "load_before": load_before, "load_after": load_avg()}
            print(f"{name}: forget {[w['id'] + ' (c%d s%d)' % (w['compartment'], w['slice']) for w in where][:5]} "
                  f"{seconds:.1f} s -> / paragon {case['ratio']:.4f} (state {result.state}, load {load_before} -> {case['load_after']})", flush=True)
            if weights is not None:
                key = (str(ward.path), weights)
                if key not in fd_before:
                    fd_before[key] = fd(ward, weights, sampler)
                case["fd_before"], case["fd_after"] = fd_before[key], fd(copy, weights, sampler)
                case["fd_change"] = case["fd_after"] / case["fd_before"] - 1
                print(f"   FD ({weights}, {sampler}, n={args.n}) before {case['fd_before']:.4f} after {case['fd_after']:.4f}: "
                      f"{100 * case['fd_change']:+.2f}% (goal within 1%: {'met' if abs(case['fd_change']) <= 0.01 else 'NOT met'})", flush=True)
            copy.close()
            out["cases"][name] = case
    print()
    print(f"paragon training: {paragon_s:.1f} s ({'measured in this run' if not args.reuse_paragon_time else 'from cache'})")
    print(f"\n| forgetting case | ID(s) (c, s) | forget wall | / paragon ({paragon_s:.1f} s) | FD before -> after |\n|---|---|---|---|---|")
    for name, case in out["cases"].items():
        goal = f" (goal <= 0.1: {'met' if case['ratio'] <= 0.1 else 'NOT met'})" if name.startswith("K=8") and "IDs" not in name else ""
        ids = ", ".join(f"{w['id']} (c{w['compartment']}, s{w['slice']})" for w in case["ids"])
        fd_change = f"{case['fd_before']:.4f} -> {case['fd_after']:.4f} ({100 * case['fd_change']:+.2f}%)" if "fd_change" in case else ""
        print(f"| {name} | {ids} | {case['seconds']:.1f} s | {case['ratio']:.4f}{goal} | {fd_change} |")
    print(f"load average after: {load_avg()}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
