"""Portable numerics / native numerics: training speed of the same job under each CPU-kernel setting (issue 21).

Figures: BENCHMARKS.md, section "Reproducibility across machines (numerics)".

    python benchmarks/numerics_speed.py [--rounds 4] [--steps 40] [--arms native,portable,...] [--json out.json]

Each arm is a fresh Python process (the kernel choice is fixed at a process's first computation) that trains the
``tiny`` denoiser of a one-compartment ward on 400 digits for ``--steps`` optimizer steps at batch 128, 2 threads, after
a warm-up stage, and reports steps/s; then samples 200 images with 50 DDIM steps and reports the seconds. Arms run one after the other in a rotated order each round, so a load change hits
every arm alike. Printed: per-arm median steps/s, each arm's ratio to ``native`` (median over rounds of the per-round
ratio), the weight hashes of each arm (portable arms must agree), and the load average.

Arms: ``native`` (DATAWARD_NUMERICS=native: each library picks its best kernels), ``portable`` (the default: ATen, oneDNN
and MKL pinned to AVX2), ``aten-avx2`` / ``dnnl-avx2`` / ``aten+dnnl`` (some libraries pinned, to see which costs
what), ``mkl-nonstrict`` (portable, but MKL's CNR without STRICT).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ARMS = {
    "native": {"DATAWARD_NUMERICS": "native"},
    "portable": {},
    "aten-avx2": {"DATAWARD_NUMERICS": "native", "ATEN_CPU_CAPABILITY": "avx2"},
    "dnnl-avx2": {"DATAWARD_NUMERICS": "native", "DNNL_MAX_CPU_ISA": "AVX2"},
    "aten+dnnl": {"DATAWARD_NUMERICS": "native", "ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"},
    "mkl-nonstrict": {"MKL_CBWR": "AVX2"},
}
PINNED = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_CBWR", "DATAWARD_NUMERICS")

WORKER = r"""
import json, sys, tempfile, time
import dataward, torch
from dataward.config import TrainConfig
from dataward.ward import Ward
steps = int(sys.argv[1])
with tempfile.TemporaryDirectory() as d:
    ward = Ward.create(d + "/w", "digits:subset=400", router=False, numerics=dataward.numerics.process_numerics(),
                       train=TrainConfig(steps=steps, batch_size=128))
    job = ward.plan(ward.lineages()[0])
    ward.run_job(job, out_root=ward.path / "models")  # warm-up (allocator, kernel caches)
    started = time.perf_counter()
    results = ward.run_job(job, out_root=ward.path / "models")
    seconds = time.perf_counter() - started
    ward.register(job, results)
    ward.sample(8, seed=0, steps=5)  # warm-up
    started = time.perf_counter()
    ward.sample(200, seed=0, steps=50)
    sample_seconds = time.perf_counter() - started
    print(json.dumps({"steps_per_s": steps / seconds, "sample_s": sample_seconds, "sha256": results[-1]["metadata"]["weights_sha256"][:16],
                      "capability": torch.backends.cpu.get_cpu_capability()}))
"""


def run_arm(name: str, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PINNED} | ARMS[name]
    out = subprocess.run([sys.executable, "-c", WORKER, str(steps)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--arms", default="native,portable,aten-avx2,dnnl-avx2")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    arms = args.arms.split(",")
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for r in range(args.rounds):
        for a in arms[r % len(arms):] + arms[:r % len(arms)]:
            runs[a].append(run_arm(a, args.steps))
            print(f"round {r + 1} {a}: {runs[a][-1]}", flush=True)
    summary = {}
    for a in arms:
        ratios = [x["steps_per_s"] / n["steps_per_s"] for x, n in zip(runs[a], runs["native"])] if "native" in runs else []
        sample_ratios = [n["sample_s"] / x["sample_s"] for x, n in zip(runs[a], runs["native"])] if "native" in runs else []
        summary[a] = {"steps_per_s": statistics.median(x["steps_per_s"] for x in runs[a]),
                      "ratio_to_native": statistics.median(ratios) if ratios else None,
                      "sample_s": statistics.median(x["sample_s"] for x in runs[a]),
                      "sample_speed_to_native": statistics.median(sample_ratios) if sample_ratios else None,
                      "hashes": sorted({x["sha256"] for x in runs[a]}), "capability": runs[a][0]["capability"]}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for a, s in summary.items():
        ratio = "" if s["ratio_to_native"] is None else f" ({s['ratio_to_native']:.3f}x native)"
        sample = "" if s["sample_speed_to_native"] is None else f" ({s['sample_speed_to_native']:.3f}x native speed)"
        print(f"{a:10s} train {s['steps_per_s']:6.2f} steps/s{ratio}  sample 200x50 steps {s['sample_s']:5.2f} s{sample}  "
              f"ATen {s['capability']}  weights {','.join(s['hashes'])}")
    print(f"load average: {load}")
    print("\n| kernels (arm) | weights |\n|---|---|")
    for a, s in summary.items():
        print(f"| `{a}` | {', '.join(h[:16] for h in s['hashes'])} |")
    if "portable" in summary and "native" in summary:
        portable = summary["portable"]
        print("\n| run (load average) | portable / native: training steps/s | portable / native: sampling speed (200 images, 50 steps) |"
              f"\n|---|---|---|\n| {args.rounds} rounds x {args.steps} steps ({load.split()[0]}) | {portable['ratio_to_native']:.3f} "
              f"| {portable['sample_speed_to_native']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arms": summary, "runs": runs, "load": load, "steps": args.steps}, f, indent=2)


if __name__ == "__main__":
    main()
