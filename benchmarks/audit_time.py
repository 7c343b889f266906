"""Audit wall time for a default digits ward at N = 1000 samples (goal: <= 2 minutes on 2 cores).

Figures: BENCHMARKS.md, section "Audit".

    python benchmarks/audit_time.py [--n 1000] [--train-steps 300] [--threads 2] [--ward PATH] [--html report.html]

Without ``--ward`` it creates a default ward (``Ward.create(path, "digits")``: one compartment, tiny UNet) in a temp
folder and trains it for ``--train-steps`` steps (training time is not what is measured; the audit's cost does not
depend on how well the model is trained). ``--standin`` times the same pipeline on the closed-form stand-in ward.
The feature net is trained (or loaded from the cache) before the clock starts; its one-off training time is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ward", type=Path, default=None, help="audit this existing ward instead of making one")
    parser.add_argument("--standin", action="store_true", help="time the pipeline on the closed-form stand-in ward")
    parser.add_argument("--html", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from dataward.audit import audit_ward, digits_feature_net

    t0 = time.perf_counter()
    net = digits_feature_net()
    print(f"feature net ready in {time.perf_counter() - t0:.1f} s (held-out accuracy {net.heldout_accuracy:.4f}, {net.path})")

    scratch = tempfile.TemporaryDirectory(prefix="dataward-bench-")
    if args.standin:
        from dataward.audit.standin import StandInWard

        ward = StandInWard(per_compartment=600)
        kind = "stand-in ward (closed-form denoisers, 2 compartments x 600)"
    else:
        from dataward.config import TrainConfig
        from dataward.ward import Ward

        if args.ward is not None:
            ward = Ward.open(args.ward)
            kind = f"ward {args.ward}"
        else:
            t0 = time.perf_counter()
            ward = Ward.create(Path(scratch.name) / "ward", "digits", train=TrainConfig(steps=args.train_steps))
            ward.train()
            print(f"default digits ward trained for {args.train_steps} steps in {time.perf_counter() - t0:.1f} s")
            kind = f"default digits ward (1 compartment, tiny UNet, {args.train_steps} training steps)"

    t0 = time.perf_counter()
    report = audit_ward(ward, n=args.n, html=args.html)
    seconds = time.perf_counter() - t0
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"{kind}: audit of N={args.n} in {seconds:.1f} s on {args.threads} thread(s)")
    print("sections (s):", json.dumps(report["timings"]))
    q, r, m = report["quality"], report["replication"], report["membership"]
    print(f"FD {q.get('fd')}, CAS {q.get('cas')}, replication {r.get('replication_rate')}, worst MIA AUC {m.get('worst_auc')}")
    timings = report["timings"]
    section_seconds = {name: f"{timings.get(name, float('nan')):.1f} s" for name in ("sampling", "quality", "replication", "membership", "total")}
    print("\n| run | machine state | N | sampling | quality (FD, CAS) | replication | membership | total |\n|---|---|---|---|---|---|---|---|")
    print(f"| {time.strftime('%Y-%m-%d')}, {kind} | load average {os.getloadavg()[0]:.2f} after | {args.n} | {section_seconds['sampling']} "
          f"| {section_seconds['quality']} | {section_seconds['replication']} | {section_seconds['membership']} | **{section_seconds['total']}** |")
    scratch.cleanup()


if __name__ == "__main__":
    main()
