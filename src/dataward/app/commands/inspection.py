"""Commands that look at a ward without changing it: status, samples (the live sample IDs), audit."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from dataward.app.commands.common import open_ward
from dataward.app.terminal import console, epsilon_delta, out, print_path
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


def status(ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."), as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the ward's compartments, models, forget requests and privacy (read-only: safe while training runs)."""
    from dataward.store.database import URL_SCHEMES
    from dataward.ward import Ward

    w = Ward.open(ward, worker=True)
    s = w.status()
    if as_json:
        print(json.dumps(asdict(s), default=str))
        return
    cfg = s.config
    print_path(out, s.path, "ward ")
    if s.ledger.startswith(URL_SCHEMES):  # a PostgreSQL ledger; the SQLite one is in the ward folder
        print_path(out, s.ledger, "ledger ")
    out.print(f"{s.samples} samples ({s.forgotten} forgotten), model {cfg.model} {cfg.image_size}px, {cfg.slices} slice(s), "
              f"weights {cfg.weights}")
    disk = s.disk_bytes
    out.print(f"size on disk: {_megabytes(disk['total'])} (training states {_megabytes(disk['train_states'])}, "
              f"in-stage checkpoints {_megabytes(disk['resume'])})")
    _print_compartments(s.compartments, bool(cfg.guard))
    protections = {c["protection"] for c in s.compartments}
    if len(protections) == 1:
        out.print(f"protection of every compartment: {next(iter(protections))}")
    else:
        for c in s.compartments:
            out.print(f"protection of compartment {c['id']}: {c['protection']}")
    if s.base:
        base = s.base
        source = f"imported from {base['imported_from']}" if base["kind"] == "imported" else f"trained on {base['data']} (public data only)"
        model = "not trained yet" if base["model"] is None else f"model #{base['model']}"
        delta = "its fine-tuned weights" if base["adapter"] == "full" else f"a {base['adapter']} adapter"
        out.print(escape(f"base: {model}, {source}; each compartment stores {delta} (its size is shown with each compartment's model)"))
    elif s.public_model:
        out.print(f"public denoiser: model #{s.public_model['id']} trained on {escape(s.public_model['data'])} (public data only)")
    if s.latent:
        ae = s.latent["autoencoder"]
        shape = "x".join(map(str, s.latent["latent_shape"]))
        out.print(f"latent space: {shape} latents of " + ("[yellow]no trained autoencoder yet[/yellow]" if ae is None else
                  f"autoencoder #{ae['id']} trained on {ae['data']} (public data only; reconstruction MSE {ae['public_reconstruction_mse']:.4f} on it)"))
    if s.router:
        out.print(f"router: model #{s.router['id']} stage {s.router['stage']} (joint: saw every compartment; retrained on forget)")
    for e in s.exports:
        state = f"[red]stale: compartment(s) {e['changed_compartments']} changed since (delete or re-export it)[/red]" if e["stale"] else "current"
        out.print(f"export {escape(e['folder'])}: compartments {e['compartments']}, class {e['label']}; {state}")
    if s.pending_forgets:
        out.print(f"[yellow]forget requests in effect, retraining pending: {', '.join(s.pending_forgets)}[/yellow] (run any command to finish)")
    if s.unerased_forgets:
        out.print(f"[yellow]forget requests in effect, not yet erased from the ledger's files (another connection reads an older snapshot): "
                  f"{', '.join(s.unerased_forgets)}[/yellow]")
    if s.privacy:
        p = s.privacy
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
    from dataward.ward_status import sample_index
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
