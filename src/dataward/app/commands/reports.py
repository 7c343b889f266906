"""Commands that look at a ward or use it: status, sample, audit, and the end-to-end demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from dataward.app.commands.common import check_writable, open_ward, parse_ids
from dataward.app.terminal import console, epsilon_delta, out, print_path, progress_bar
from dataward.errors import DatawardError


def _megabytes(size: int | None) -> str:
    return "?" if size is None else f"{size / 1e6:.1f} MB"


def _model_summary(model: dict | None) -> str:
    return "-" if model is None else f"#{model['id']} stage {model['stage']}, {model['steps']} steps, {_megabytes(model['bytes'])}"


def _guard_lines(guard: dict | None) -> list[str]:
    """A guard by timestep: its accuracy on its own random bits, and how often it is sure enough to steer (p > 1 − α)
    on its members and on public images it never saw (its false positives). Guards trained before issue 17 lack the latter."""
    if not guard:
        return ["-"]
    rows = [("bits right", guard["accuracy_by_t"] or {})]
    if guard.get("confident_public_by_t") is not None:
        rows += [(f"sure on members (p > {1 - guard['alpha']:g})", guard["confident_members_by_t"]),
                 ("sure on public images", guard["confident_public_by_t"])]
    width = max(len(name) for name, _ in rows)
    return [f"by t = {'/'.join(rows[0][1])}:"] + [f"{name:<{width}}  " + " ".join(f"{v:.2f}" for v in by_t.values()) for name, by_t in rows]


def _print_compartments(compartments: list[dict], guards: bool) -> None:
    """One table row per compartment when the table fits the terminal's width; otherwise one block of lines per
    compartment (a table squeezed into 80 columns wraps its cells into slivers)."""
    table = Table()
    for col in ("compartment", "source", "samples", "forgotten", "serving", "model") + (("guard",) if guards else ()):
        table.add_column(col)
    for c in compartments:
        row = [str(c["id"]), escape(c["source"]), str(c["samples"]), str(c["forgotten"]), c["serving"], _model_summary(c.get("model"))]
        table.add_row(*row, *(["\n".join(_guard_lines(c["guard"]))] if guards else []))
    if out.measure(table, options=out.options.update(max_width=1 << 16)).maximum <= out.width:  # its unwrapped width
        out.print(table)
        return
    for c in compartments:
        out.print(Text(f"compartment {c['id']}: {c['samples']} samples ({c['forgotten']} forgotten), serving {c['serving']}"))
        lines = [(4, f"source: {c['source']}"), (4, f"model: {_model_summary(c.get('model'))}")]
        if guards:
            lines += [(4, "guard:")] + [(6, line) for line in _guard_lines(c["guard"])]
        for indent, line in lines:
            out.print(Padding(Text(line), (0, 0, 0, indent), expand=False))  # wrapped lines stay indented under their compartment


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def status(ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."), as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the ward's compartments, models, forget requests and privacy (read-only: safe while training runs)."""
    from dataward.store.database import URL_SCHEMES
    from dataward.ward import Ward

    w = Ward.open(ward, worker=True)
    s = w.status()
    if as_json:
        print(json.dumps(s, default=str))
        return
    cfg = s["config"]
    print_path(out, s["path"], "ward ")
    if s["ledger"].startswith(URL_SCHEMES):  # a PostgreSQL ledger; the SQLite one is in the ward folder
        print_path(out, s["ledger"], "ledger ")
    out.print(f"{s['samples']} samples ({s['forgotten']} forgotten), model {cfg['model']} {cfg['image_size']}px, {cfg['slices']} slice(s), "
              f"weights {cfg['weights']}")
    disk = s["disk_bytes"]
    out.print(f"size on disk: {_megabytes(disk['total'])} (training states {_megabytes(disk['train_states'])}, "
              f"in-stage checkpoints {_megabytes(disk['resume'])})")
    _print_compartments(s["compartments"], bool(cfg["guard"]))
    protections = {c["protection"] for c in s["compartments"]}
    if len(protections) == 1:
        out.print(f"protection of every compartment: {next(iter(protections))}")
    else:
        for c in s["compartments"]:
            out.print(f"protection of compartment {c['id']}: {c['protection']}")
    if s["base"]:
        base = s["base"]
        source = f"imported from {base['imported_from']}" if base["kind"] == "imported" else f"trained on {base['data']} (public data only)"
        model = "not trained yet" if base["model"] is None else f"model #{base['model']}"
        delta = "its fine-tuned weights" if base["adapter"] == "full" else f"a {base['adapter']} adapter"
        out.print(escape(f"base: {model}, {source}; each compartment stores {delta} (its size is shown with each compartment's model)"))
    elif s["public_model"]:
        out.print(f"public denoiser: model #{s['public_model']['id']} trained on {escape(s['public_model']['data'])} (public data only)")
    if s["latent"]:
        ae = s["latent"]["autoencoder"]
        shape = "x".join(map(str, s["latent"]["latent_shape"]))
        out.print(f"latent space: {shape} latents of " + ("[yellow]no trained autoencoder yet[/yellow]" if ae is None else
                  f"autoencoder #{ae['id']} trained on {ae['data']} (public data only; reconstruction MSE {ae['public_reconstruction_mse']:.4f} on it)"))
    if s["router"]:
        out.print(f"router: model #{s['router']['id']} stage {s['router']['stage']} (joint: saw every compartment; retrained on forget)")
    for e in s["exports"]:
        state = f"[red]stale: compartment(s) {e['changed_compartments']} changed since (delete or re-export it)[/red]" if e["stale"] else "current"
        out.print(f"export {escape(e['folder'])}: compartments {e['compartments']}, class {e['label']}; {state}")
    if s["pending_forgets"]:
        out.print(f"[yellow]forget requests in effect, retraining pending: {', '.join(s['pending_forgets'])}[/yellow] (run any command to finish)")
    if s["unerased_forgets"]:
        out.print(f"[yellow]forget requests in effect, not yet erased from the ledger's files (another connection reads an older snapshot): "
                  f"{', '.join(s['unerased_forgets'])}[/yellow]")
    if s.get("privacy"):
        p = s["privacy"]
        per = "; ".join(f"compartment {c}: " + (v if isinstance(v, str) else f"{epsilon_delta(v['epsilon'], v['delta'])}, σ = {v['sigma']:.3f}, "
                                                   f"{v['steps']} steps, {100 * v['trainable_fraction']:.1f}% of parameters ({v['trainable']})"
                                                   + (f", {v['noise_multiplicity']} noise draws per example" if (v.get("noise_multiplicity") or 1) > 1 else ""))
                        for c, v in p["compartments"].items())
        out.print(f"privacy: ward {epsilon_delta(p['ward_epsilon'], p['ward_delta'])} (max over compartments); {per}")
        for note in p["notes"]:
            out.print(f"  note: {note}")


def samples(
    ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."),
    compartment: Optional[int] = typer.Option(None, "--compartment", help="List only this compartment's samples."),
    search: Optional[str] = typer.Option(None, "--search", metavar="TEXT", help="List only IDs that contain TEXT (case-insensitive)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the ward's live sample IDs (the IDs `forget` takes), with compartment, slice and class; forgotten IDs are never listed."""
    from dataward.reports import sample_index
    from dataward.ward import Ward

    rows = sample_index(Ward.open(ward, worker=True).ledger, compartment, search)
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        out.print(Text(f"{row['id']}  compartment {row['compartment']}  slice {row['slice']}"
                       + ("" if row["label"] is None else f"  class {row['label']}")), soft_wrap=True)
    where = "" if compartment is None else f" in compartment {compartment}"
    match = "" if search is None else f" containing {search!r}"
    out.print(Text(f"{len(rows)} live sample ID(s){where}{match} (forgotten IDs are never listed)"))


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


def audit(
    ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."),
    n: int = typer.Option(1000, "-n", "--n", help="Number of images drawn for quality and replication."),
    seed: int = typer.Option(0, help="Sampling seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report."),
    html: Optional[Path] = typer.Option(None, "--html", metavar="FILE", help="Write a self-contained HTML report to this file."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", metavar="FILE", help="Write the JSON report to this file (--json prints it)."),
    inception: Optional[Path] = typer.Option(None, "--inception", help="Local feature-network weights for non-digits data."),
    features: Optional[Path] = typer.Option(None, "--features", help="Your feature network's weights (.safetensors), built by --features-module."),
    features_module: Optional[str] = typer.Option(None, "--features-module", help="package.module:factory that builds your feature network."),
    heldout: Optional[str] = typer.Option(None, "--heldout", help="Held-out images of your data (a data spec) for FD and membership."),
    verify_forgetting: bool = typer.Option(False, "--verify", help="Add the bitwise forgetting certificate (retrains every model)."),
) -> None:
    """Measure quality, replication, membership inference, forgetting and privacy; write JSON and HTML reports."""
    from dataward.audit import audit_ward
    from dataward.audit.report import summary_rows, write_json

    from dataward.audit.features import module_from_safetensors
    from dataward.data import load_source

    if (features is None) != (features_module is None):
        raise DatawardError("--features and --features-module go together: the weights file and the factory that builds the module")
    network = module_from_safetensors(features, features_module) if features else None
    w = open_ward(ward)
    report = audit_ward(w, n=n, seed=seed, inception=inception, features=network, heldout=load_source(heldout) if heldout else None,
                        verify=verify_forgetting, html=html,
                        progress=None if as_json else (lambda message: console.print(f"[dim]audit:[/dim] {message}")))
    if json_out:
        write_json(json_out, report)
    if as_json:
        from dataward.audit.report import json_default

        print(json.dumps(report, default=json_default))
        return
    table = Table(title=f"audit of {ward}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in summary_rows(report):
        table.add_row(name, value)
    out.print(table)
    if html:
        print_path(out, html, "report: ")


def demo(out_dir: Path = typer.Option(Path("demo-out"), "--out", metavar="DIR", help="Folder the demo writes into: its ward (replaced if there), pictures, summary.json and report.html."),
         quick: bool = typer.Option(False, "--quick", help="A shorter run (smaller training budget).")) -> None:
    """Show the whole product end to end on the bundled digits."""
    from dataward.app.demo import run_demo

    run_demo(out_dir, quick=quick, console=out)


