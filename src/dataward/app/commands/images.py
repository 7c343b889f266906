"""Commands that make images: sample (composed over the allowed compartments) and demo (the product end to end on
the bundled digits, with its pictures and report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from dataward.app.commands.common import check_writable, open_ward, parse_ids
from dataward.app.terminal import console, out, print_path, progress_bar
from dataward.errors import DatawardError


def sample(
    ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."),
    n: int = typer.Option(64, "-n", "--n", help="Number of images."),
    label: Optional[int] = typer.Option(None, help="Class label for all samples (random by default)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    sampler: Optional[str] = typer.Option(None, help="ddim | ddpm (default: ddim; ddpm for density weights)."),
    steps: int = typer.Option(50, help="Sampling steps."),
    allow: Optional[str] = typer.Option(None, help="Compartments to compose, e.g. 0,3 (all by default)."),
    weights: Optional[str] = typer.Option(None, help="density (a mixture, compartment-pure) | router (a mixture) | soup (one averaged model: fastest) (the ward's default otherwise)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Evaluate only the k heaviest compartments per sample and step."),
    guard: bool = typer.Option(False, "--guard", help="Steer away from training data with each compartment's guard."),
    guard_scale: Optional[float] = typer.Option(None, "--guard-scale", help="Guard guidance scale s."),
    guard_alpha: Optional[float] = typer.Option(None, "--guard-alpha", help="Guard confidence threshold α."),
    grid: Optional[Path] = typer.Option(None, "--grid", metavar="PNG", help="Write the images as one PNG grid to this file."),
    npz: Optional[Path] = typer.Option(None, "--npz", metavar="FILE", help="Write the samples to this .npz file (images, labels, attribution, final_weights, compartments)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary with per-sample attribution."),
) -> None:
    """Generate samples composed over the allowed compartments (keep them with --grid, --npz or --json)."""
    if not (grid or npz or as_json):
        raise DatawardError("nothing would be kept of these samples: add --grid grid.png, --npz samples.npz or --json")
    check_writable(grid, npz)
    w = open_ward(ward, resume=False)  # a pending retraining never blocks sampling: models that saw forgotten IDs are never served
    if w.ledger.pending_forgets():
        console.print(f"[yellow]a forget's retraining is pending: sampling uses clean fallback stages; `dataward train {escape(str(ward))}` finishes it[/yellow]")
    with progress_bar(not as_json) as progress:
        r = w.sample(n, label=label, seed=seed, sampler=sampler, steps=steps, allowed=parse_ids(allow), weights=weights, top_k=top_k,
                     guard=guard, guard_scale=guard_scale, guard_alpha=guard_alpha, progress=progress)
    if grid:
        from dataward.plots import image_grid

        image_grid(r.images, grid, r.labels, caption=r.caption(seed=seed), attribution=r.attribution)
    if npz:
        arrays = {"images": r.images.numpy().astype(np.float32), "attribution": r.attribution.numpy(), "final_weights": r.final_weights.numpy(),
                  "compartments": np.array(r.compartments)}
        if r.labels is not None:
            arrays["labels"] = r.labels.numpy()
        np.savez(npz, **arrays)
    summary = {
        "n": n, "compartments": r.compartments, "weights": r.weights, "sampler": r.sampler, "seconds": round(r.seconds, 3),
        "models": {str(k): v for k, v in r.models.items()}, "grid": str(grid) if grid else None, "npz": str(npz) if npz else None,
        "labels": None if r.labels is None else r.labels.tolist(),
        "attribution": r.attribution.tolist(), "final_weights": r.final_weights.tolist(), "guard_guided": r.guard_guided,
    }
    if as_json:
        print(json.dumps(summary))
        return
    mean = r.attribution.mean(0).tolist()
    table = Table(title=f"{n} samples in {r.seconds:.1f} s ({r.weights} weights, {r.sampler})")
    table.add_column("compartment")
    table.add_column("mean attribution", justify="right")
    table.add_column("model")
    for c in r.compartments:
        info = r.models[c]
        table.add_row(str(c), f"{mean[w.compartments().index(c)]:.3f}", f"stage {info['stage']}" + (" (fallback)" if info["fallback"] else ""))
    out.print(table)
    if r.guard_guided is not None:
        out.print(f"guards guided {100 * r.guard_guided:.1f}% of their checks (sample x step x compartment, t below the guard's max timestep)")
    for name, path in (("grid", grid), ("npz", npz)):
        if path:
            print_path(out, path, f"{name}: ")


def demo(out_dir: Path = typer.Option(Path("demo-out"), "--out", metavar="DIR", help="Folder the demo writes into: its ward (replaced if there), pictures, summary.json and report.html."),
         quick: bool = typer.Option(False, "--quick", help="A shorter run (smaller training budget).")) -> None:
    """Show the whole product end to end on the bundled digits."""
    from dataward.app.demo import run_demo

    run_demo(out_dir, quick=quick, console=out)
