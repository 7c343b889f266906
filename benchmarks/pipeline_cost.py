"""WardPipeline / Ward.sample time for the same work (issue 20; goal <= 1.05), and an export's size vs one compartment.

Figures: BENCHMARKS.md, section "diffusers pipeline, exports and image sizes (issue 20)".

Builds a K=4, R=2 ward of 400 digits fine-tuned (full) from a freshly initialised imported base in a temporary folder
(quality is irrelevant here), then times both paths interleaved, same seeds, in one process.

    python benchmarks/pipeline_cost.py --reps 7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    from dataward.config import TrainConfig
    from dataward.sampling.export import export_ward
    from dataward.models.nets import build_unet
    from dataward.sampling.pipeline import WardPipeline
    from dataward.store.checkpoints import WEIGHTS_FILE
    from dataward.ward import Ward

    torch.set_num_threads(2)
    diffusers_logging.disable_progress_bar()
    scratch = Path(tempfile.mkdtemp(prefix="dataward-pipeline-"))
    try:
        build_unet("tiny", 8, 1, 10, seed=7).save_pretrained(str(scratch / "base"), safe_serialization=True)
        ward = Ward.create(scratch / "w", "digits:subset=400", compartments=4, slices=2, router=False, base=str(scratch / "base"),
                           train=TrainConfig(steps=10, batch_size=16))
        ward.train()
        report: dict = {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2), "n": args.n, "steps": args.steps}
        for weights in ("density", "soup"):
            pipe = WardPipeline(ward, weights=weights)
            pipe.set_progress_bar_config(disable=True)
            times = {"ward": [], "pipeline": []}
            for rep in range(args.reps + 1):  # the first round warms the model cache
                for arm in ("ward", "pipeline") if rep % 2 == 0 else ("pipeline", "ward"):
                    started = time.perf_counter()
                    if arm == "ward":
                        ward.sample(args.n, seed=rep, steps=args.steps, weights=weights)
                    else:
                        pipe(batch_size=args.n, generator=torch.Generator().manual_seed(rep), num_inference_steps=args.steps, output_type="pt")
                    if rep:
                        times[arm].append(time.perf_counter() - started)
            ward_s, pipe_s = statistics.median(times["ward"]), statistics.median(times["pipeline"])
            report[weights] = {"ward_sample_s": round(ward_s, 4), "pipeline_s": round(pipe_s, 4), "pipeline_over_ward": round(pipe_s / ward_s, 3)}
        manifest = export_ward(ward.read(), scratch / "export", allowed=[0, 1], label=3)
        one = ward.path / ward.served()[0].path
        report["export_bytes"] = folder_bytes(Path(manifest["folder"]))
        report["one_compartment_checkpoint_bytes"] = folder_bytes(one)
        report["one_compartment_weights_bytes"] = (one / WEIGHTS_FILE).stat().st_size
        report["export_over_one_compartment_checkpoint"] = round(report["export_bytes"] / report["one_compartment_checkpoint_bytes"], 3)
        report["export_over_one_compartment_weights"] = round(report["export_bytes"] / report["one_compartment_weights_bytes"], 3)
        ward.close()
        print(json.dumps(report, indent=2))
        cells = [f"{report[w]['ward_sample_s']} s vs {report[w]['pipeline_s']} s: **{report[w]['pipeline_over_ward']}**" for w in ("density", "soup")]
        print(f"\n| run | load at start | density | soup |\n|---|---|---|---|\n| `--reps {args.reps}` | {report['load_avg_1m_at_start']} | "
              + " | ".join(cells) + " |")
        print(f"\nExport size: {report['export_bytes']:,} bytes = **{report['export_over_one_compartment_weights']}x one compartment's weights "
              f"file** ({report['one_compartment_weights_bytes']:,} bytes) and {report['export_over_one_compartment_checkpoint']}x one "
              f"compartment's checkpoint folder ({report['one_compartment_checkpoint_bytes']:,} bytes)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
