"""The ``dataward`` command line: a thin layer over :class:`dataward.ward.Ward`.

Errors users can fix print one line and exit 1 (a traceback only with ``--debug``).
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dataward.errors import DatawardError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and serve diffusion models that protect their training data.")
console = Console(stderr=True)
out = Console()
STATE = {"debug": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    STATE["debug"] = debug


@contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress | None]:
    """A rich progress display on stderr (none when ``enabled`` is false, e.g. for --json)."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        yield progress


def parse_ids(text: str | None) -> list[int] | None:
    """``"0,3"`` -> [0, 3]; None stays None."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DatawardError(f"expected comma-separated compartment numbers like 0,3, got {text!r}") from None


def open_ward(path: Path, resume: bool = True, device: str = "cpu"):
    """Open a ward; finish any interrupted forget or training first (the ledger remembers it)."""
    from dataward.ward import Ward

    ward = Ward.open(path)
    if resume and ward.ledger.pending_forgets():
        console.print("[yellow]finishing an interrupted forget request first[/yellow]")
        with progress_bar() as progress:
            ward.train(device=device, progress=progress)
    return ward


def save_grid(images, path: Path, labels=None) -> None:
    """Save (N, C, H, W) images in [0, 1] as a PNG grid (upscaled so 8x8 digits are visible)."""
    from dataward.plots import image_grid

    image_grid(images, path, labels)


@app.command()
def init(
    ward: Path = typer.Argument(..., help="Folder for the new ward."),
    data: str = typer.Option("digits", "--data", help="Data source: digits, digits:subset=N, printed[:count=N], folder:PATH, npz:PATH."),
    model: str = typer.Option("tiny", help="UNet preset: tiny (8x8, CPU), small (16-32 px), base (64 px, GPU)."),
    seed: int = typer.Option(0, help="Root seed of everything the ward trains."),
    image_size: int = typer.Option(8, "--image-size", help="Images are resized to this size."),
    compartments: int = typer.Option(1, "--compartments", "-k", help="Number of compartments K."),
    by: str = typer.Option("random", help="Assign samples to compartments by: random | label | source."),
    slices: int = typer.Option(1, help="SISA slices per compartment (forgetting retrains from the slice that held the ID)."),
    weights: str = typer.Option("density", help="Default composition weights: density (compartment-pure) | router."),
    router: bool = typer.Option(True, help="Train the joint router when K > 1."),
    guard: bool = typer.Option(False, "--guard", help="Train a CPSample guard per compartment."),
    epochs: float = typer.Option(200.0, help="Training budget: epochs over each compartment's data."),
    steps: Optional[int] = typer.Option(None, help="Training budget in optimizer steps per compartment (overrides --epochs)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Batch size."),
    numerics: str = typer.Option("portable", help="CPU kernels: portable (the same bytes on every AVX2 machine) | native (fastest; bytes tied to this CPU)."),
) -> None:
    """Create a ward from a data source."""
    from dataward.training.loop import TrainConfig
    from dataward.ward import Ward

    w = Ward.create(ward, data, compartments=compartments, by=by, slices=slices, model=model, seed=seed, image_size=image_size,
                    weights=weights, router=router, guard=guard, train=TrainConfig(epochs=epochs, steps=steps, batch_size=batch_size),
                    numerics=numerics)
    status = w.status()
    out.print(f"created ward [bold]{ward}[/bold]: {status['samples']} samples in {len(status['compartments'])} compartment(s), "
              f"{slices} slice(s) each. Next: dataward train {ward}")


@app.command()
def train(
    ward: Path = typer.Argument(..., help="The ward folder."),
    steps: Optional[int] = typer.Option(None, help="Override the ward's training budget: optimizer steps per compartment."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    executor: str = typer.Option("local", help="local (this process) | ray (one Ray task per compartment job; pip install 'dataward[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to use, e.g. auto (default: start a local Ray)."),
    gpus_per_job: float = typer.Option(0.0, "--gpus-per-job", help="GPUs each Ray job asks for (fractions share a GPU); needs --device cuda."),
    cpus_per_job: float = typer.Option(1.0, "--cpus-per-job", help="CPUs each Ray job asks for."),
    dp: bool = typer.Option(False, "--dp", help="Fine-tune the compartments' denoisers with DP-SGD (from the public model if pretrained)."),
    epsilon: float = typer.Option(10.0, "--epsilon", help="DP: target ε."),
    delta: Optional[float] = typer.Option(None, "--delta", help="DP: target δ (default 1/(10 N); must be < 1/N)."),
    clip: Optional[float] = typer.Option(None, "--clip", help="DP: per-sample gradient clipping norm C (default: the median per-example gradient norm on the public data; 1.0 without public pretraining)."),
    batch: int = typer.Option(256, "--batch", help="DP: expected logical batch (Poisson sampling)."),
    epochs: int = typer.Option(50, "--epochs", help="DP: passes over each compartment's data."),
    trainable: str = typer.Option("attention", "--trainable", help="DP: attention (DP-LDM: attention modules + class embedding) | embedding (class embedding only: best at small ε or N) | full."),
    accountant: str = typer.Option("prv", "--accountant", help="DP: prv | rdp."),
    dp_lr: Optional[float] = typer.Option(None, "--lr", help="DP: Adam learning rate (default: 1e-2 with --trainable attention, 1e-1 with embedding, 2e-3 with full)."),
    noise_multiplicity: int = typer.Option(1, "--noise-multiplicity", help="DP: K draws of (t, noise) per example and step, averaged before clipping (DPDM): same ε, better quality, K x compute."),
    dp_compartments: Optional[str] = typer.Option(None, "--compartment", help="DP: only these compartments, e.g. 3 or 0,2 (default: all)."),
) -> None:
    """Train every missing or out-of-date model of the ward (resumes interrupted work); --dp for DP fine-tuning."""
    w = open_ward(ward, resume=False)
    if steps is not None:
        from dataclasses import replace

        w.config = replace(w.config, train=replace(w.config.train, steps=steps))
        w._write_config()
    options = {} if executor != "ray" else dict(ray_address=ray_address, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job)
    with progress_bar() as progress:
        if dp:
            from dataward.training.privacy import DPConfig

            config = DPConfig(epsilon=epsilon, delta=delta, clip=clip, batch=batch, epochs=epochs, trainable=trainable, accountant=accountant,
                               lr=dp_lr, noise_multiplicity=noise_multiplicity)
            w.enable_dp(config, parse_ids(dp_compartments), train=False)
        result = w.train(device=device, progress=progress, executor=executor, **options)
    out.print(f"trained in {result['seconds']:.1f} s; ward is up to date")
    privacy = w.privacy()
    if privacy:
        out.print(f"privacy: ward ε = {privacy['ward_epsilon']}, δ = {privacy['ward_delta']:.3g}; " +
                  ", ".join(f"compartment {c}: " + (v if isinstance(v, str) else f"ε={v['epsilon']:.3f} σ={v['sigma']:.3f}") for c, v in privacy["compartments"].items()))
        for note in privacy["notes"]:
            out.print(f"  note: {note}")


@app.command()
def pretrain(
    ward: Path = typer.Argument(..., help="The ward folder."),
    public: str = typer.Option("printed:count=3000", "--public", help="Public data, e.g. printed:count=3000."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: the ward's public budget in epochs)."),
    latent: bool = typer.Option(False, "--latent", help="Latent diffusion: train a public autoencoder first; every model of the ward then works on its latents."),
    autoencoder_steps: Optional[int] = typer.Option(None, "--autoencoder-steps", help="With --latent: autoencoder training steps."),
    autoencoder_data: Optional[str] = typer.Option(None, "--autoencoder-data", help="With --latent: public data of the autoencoder (default strokes:count=10000)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Pretrain the public models on public data: a denoiser (and with --latent an autoencoder); `train --dp` fine-tunes from them (DP-LDM)."""
    from dataclasses import replace

    from dataward.training.loop import TrainConfig

    if (autoencoder_steps is not None or autoencoder_data is not None) and not latent:
        raise DatawardError("--autoencoder-steps and --autoencoder-data need --latent (pixel wards have no autoencoder)")
    if autoencoder_steps is not None and autoencoder_steps < 1:
        raise DatawardError(f"--autoencoder-steps must be at least 1, got {autoencoder_steps}")
    w = open_ward(ward, device=device)
    trained_before = {r.metadata.get("variant", "") for r in w.served().values()}
    budget = TrainConfig(steps=steps) if steps is not None else None
    autoencoder = None if autoencoder_steps is None else replace(w.config.autoencoder, steps=autoencoder_steps)
    with progress_bar() as progress:
        result = w.pretrain(public, budget, device=device, progress=progress, latent=latent, autoencoder=autoencoder, autoencoder_data=autoencoder_data)
    models = "the public autoencoder and latent denoiser" if latent else "the public denoiser"
    out.print(f"pretrained {models} on {public} in {result['seconds']:.1f} s (recorded in the ledger as public)")
    if latent:
        shape = "x".join(map(str, w.model_shape()))
        mse = w.served("autoencoder")[None].metadata["public_reconstruction_mse"]
        out.print(f"latent space: {shape} latents; autoencoder trained on {w.config.autoencoder_data}, reconstruction MSE on it {mse:.4f}")
    if trained_before and w.models_missing():
        out.print(f"the compartments' models are out of date (trained in another space or from another public model): "
                  f"run `dataward train {ward}` to retrain them")


@app.command()
def guard(
    ward: Path = typer.Argument(..., help="The ward folder."),
    steps: Optional[int] = typer.Option(None, help="Guard training steps (default: the guard's epochs)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Add CPSample guards to every compartment and train them (sample with --guard)."""
    from dataclasses import replace

    w = open_ward(ward, device=device)
    settings = w.config.guard_settings if steps is None else replace(w.config.guard_settings, steps=steps)
    with progress_bar() as progress:
        result = w.enable_guards(settings, device=device, progress=progress)
    out.print(f"guards trained in {result['seconds']:.1f} s; sample with: dataward sample {ward} --guard")


@app.command()
def audit(
    ward: Path = typer.Argument(..., help="The ward folder."),
    n: int = typer.Option(1000, "--n", help="Samples drawn for quality and replication."),
    seed: int = typer.Option(0, help="Sampling seed."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write a self-contained HTML report here."),
    json_out: Optional[Path] = typer.Option(None, "--out", help="Write the JSON report here."),
    inception: Optional[Path] = typer.Option(None, "--inception", help="Local feature-network weights for non-digits data."),
    verify_forgetting: bool = typer.Option(False, "--verify", help="Add the bitwise forgetting certificate (retrains every model)."),
) -> None:
    """Measure quality, replication, membership inference, forgetting and privacy; write JSON and HTML reports."""
    from dataward.audit import audit_ward
    from dataward.audit.report import summary_rows, write_json

    w = open_ward(ward)
    report = audit_ward(w, n=n, seed=seed, inception=inception, verify=verify_forgetting, html=html,
                        progress=None if as_json else (lambda message: console.print(f"[dim]audit:[/dim] {message}")))
    if json_out:
        write_json(json_out, report)
    if as_json:
        from dataward.audit.report import _json_default

        print(json.dumps(report, default=_json_default))
        return
    table = Table(title=f"audit of {ward}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, value in summary_rows(report):
        table.add_row(name, value)
    out.print(table)
    if html:
        out.print(f"report: {html}")


@app.command()
def sample(
    ward: Path = typer.Argument(..., help="The ward folder."),
    n: int = typer.Option(64, "-n", help="Number of samples."),
    label: Optional[int] = typer.Option(None, help="Class label for all samples (random by default)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    sampler: Optional[str] = typer.Option(None, help="ddim | ddpm (default: ddim; ddpm for density weights)."),
    steps: int = typer.Option(50, help="Sampling steps."),
    allow: Optional[str] = typer.Option(None, help="Compartments to compose, e.g. 0,3 (all by default)."),
    weights: Optional[str] = typer.Option(None, help="router | density (the ward's default otherwise)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Evaluate only the k heaviest compartments per sample and step."),
    guard: bool = typer.Option(False, "--guard", help="Steer away from training data with each compartment's guard."),
    guard_scale: Optional[float] = typer.Option(None, "--guard-scale", help="Guard guidance scale s."),
    guard_alpha: Optional[float] = typer.Option(None, "--guard-alpha", help="Guard confidence threshold α."),
    out_png: Optional[Path] = typer.Option(None, "--out", help="Write a PNG grid here."),
    save: Optional[Path] = typer.Option(None, "--save", help="Write samples.npz (images, labels, attribution, final_weights)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary with per-sample attribution."),
) -> None:
    """Generate samples composed over the allowed compartments."""
    w = open_ward(ward)
    with progress_bar(not as_json) as progress:
        r = w.sample(n, label=label, seed=seed, sampler=sampler, steps=steps, allowed=parse_ids(allow), weights=weights, top_k=top_k,
                     guard=guard, guard_scale=guard_scale, guard_alpha=guard_alpha, progress=progress)
    if out_png:
        save_grid(r.images, out_png, r.labels)
    if save:
        arrays = {"images": r.images.numpy().astype(np.float32), "attribution": r.attribution.numpy(), "final_weights": r.final_weights.numpy(),
                  "compartments": np.array(r.compartments)}
        if r.labels is not None:
            arrays["labels"] = r.labels.numpy()
        np.savez(save, **arrays)
    summary = {
        "n": n, "compartments": r.compartments, "weights": r.weights, "sampler": r.sampler, "seconds": round(r.seconds, 3),
        "models": {str(k): v for k, v in r.models.items()}, "grid": str(out_png) if out_png else None, "npz": str(save) if save else None,
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
        table.add_row(str(c), f"{mean[w.compartments().index(c)]:.3f}", f"stage {info['stage'] + 1}" + (" (fallback)" if info["fallback"] else ""))
    out.print(table)
    if r.guard_guided is not None:
        out.print(f"guards guided {100 * r.guard_guided:.1f}% of their checks (sample x step x compartment, t below the guard's max timestep)")
    for label_, path in (("grid", out_png), ("npz", save)):
        if path:
            out.print(f"{label_}: {path}")


@app.command()
def status(ward: Path = typer.Argument(..., help="The ward folder."), as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show the ward's compartments, models, forget requests and privacy (read-only: safe while training runs)."""
    from dataward.ward import Ward

    w = Ward.open(ward, worker=True)
    s = w.status()
    if as_json:
        print(json.dumps(s, default=str))
        return
    cfg = s["config"]
    out.print(f"[bold]{s['path']}[/bold]: {s['samples']} samples ({s['forgotten']} forgotten), model {cfg['model']} {cfg['image_size']}px, "
              f"{cfg['slices']} slice(s), weights {cfg['weights']}")
    guards = bool(cfg["guard"])
    table = Table()
    for col in ("compartment", "source", "samples", "forgotten", "serving", "model") + (("guard accuracy on its bits by t",) if guards else ()):
        table.add_column(col)
    for c in s["compartments"]:
        model = c.get("model")
        row = [str(c["id"]), c["source"], str(c["samples"]), str(c["forgotten"]), c["serving"],
               "-" if model is None else f"#{model['id']} stage {model['stage'] + 1}, {model['steps']} steps"]
        if guards:
            row.append("-" if not c["guard"] else ", ".join(f"{t}: {a:.2f}" for t, a in (c["guard"]["accuracy_by_t"] or {}).items()))
        table.add_row(*row)
    out.print(table)
    if s["public_model"]:
        out.print(f"public denoiser: model #{s['public_model']['id']} trained on {s['public_model']['data']} (public data only)")
    if s["latent"]:
        ae = s["latent"]["autoencoder"]
        shape = "x".join(map(str, s["latent"]["latent_shape"]))
        out.print(f"latent space: {shape} latents of " + ("[yellow]no trained autoencoder yet[/yellow]" if ae is None else
                  f"autoencoder #{ae['id']} trained on {ae['data']} (public data only; reconstruction MSE {ae['public_reconstruction_mse']:.4f} on it)"))
    if s["router"]:
        out.print(f"router: model #{s['router']['id']} stage {s['router']['stage'] + 1} (joint: saw every compartment; retrained on forget)")
    if s["pending_forgets"]:
        out.print(f"[yellow]forget requests in effect, retraining pending: {', '.join(s['pending_forgets'])}[/yellow] (run any command to finish)")
    if s.get("privacy"):
        p = s["privacy"]
        per = "; ".join(f"compartment {c}: " + (v if isinstance(v, str) else f"ε = {v['epsilon']:.3f}, δ = {v['delta']:.2e}, σ = {v['sigma']:.3f}, "
                                                   f"{v['steps']} steps, {100 * v['trainable_fraction']:.1f}% of parameters ({v['trainable']})"
                                                   + (f", {v['noise_multiplicity']} noise draws per example" if (v.get("noise_multiplicity") or 1) > 1 else ""))
                        for c, v in p["compartments"].items())
        ward_eps = p["ward_epsilon"] if isinstance(p["ward_epsilon"], str) else f"{p['ward_epsilon']:.3f}"
        out.print(f"privacy: ward ε = {ward_eps} at δ = {p['ward_delta']:.2e} (max over compartments); {per}")
        for note in p["notes"]:
            out.print(f"  note: {note}")


@app.command()
def forget(
    ward: Path = typer.Argument(..., help="The ward folder."),
    ids: Optional[list[str]] = typer.Argument(None, help="Sample IDs to forget."),
    ids_file: Optional[Path] = typer.Option(None, "--ids-file", help="A file with one sample ID per line."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Forget samples: in effect at once, then retrain what saw them from the slice before."""
    all_ids = list(ids or [])
    if ids_file:
        if not ids_file.is_file():
            raise DatawardError(f"--ids-file {ids_file} does not exist")
        all_ids += [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    w = open_ward(ward, device=device)
    with progress_bar(not as_json) as progress:
        result = w.forget(all_ids, device=device, progress=progress)
    if as_json:
        print(json.dumps(result))
        return
    if result["state"] == "noop":
        out.print(f"[yellow]nothing to do:[/yellow] {result['message']}")
        return
    out.print(f"forget request {result['request']}: {len(result['ids'])} ID(s) forgotten; in effect at once "
              f"({result['quarantined_models']} model(s) that saw them quarantined and deleted)")
    for c, state in result["serving_during_retraining"].items():
        out.print(f"  while retraining, compartment {c}: {state}")
    if result["already_forgotten"]:
        out.print(f"  already forgotten before: {', '.join(result['already_forgotten'])}")
    out.print(f"retrained in {result.get('retrain_seconds', 0):.1f} s; state: {result['state']}. Certificate: dataward verify {ward}")


@app.command()
def verify(ward: Path = typer.Argument(..., help="The ward folder."), device: str = typer.Option("cpu"),
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Forgetting certificate: retrain every served model from scratch and compare weight hashes bit for bit."""
    w = open_ward(ward, device=device)
    with progress_bar(not as_json) as progress:
        cert = w.verify(device=device, progress=progress)
    if as_json:
        print(json.dumps(cert))
    else:
        table = Table(title=f"certificate: {'OK' if cert['ok'] else 'FAILED'} ({cert['forgotten']} forgotten IDs)")
        for col in ("model", "served sha256", "from scratch", "equal", "saw forgotten"):
            table.add_column(col)
        for m in cert["models"]:
            name = m["kind"] + ("" if m["compartment"] is None else f" {m['compartment']}")
            table.add_row(name, m.get("served_sha256", "-")[:16], m.get("scratch_sha256", "-")[:16], "yes" if m["equal"] else "NO", str(m.get("saw_forgotten_ids", "-")))
        out.print(table)
    if not cert["ok"]:
        raise typer.Exit(1)


@app.command()
def add(ward: Path = typer.Argument(..., help="The ward folder."), data: str = typer.Option(..., "--data", help="The new data source."),
        device: str = typer.Option("cpu")) -> None:
    """Continual learning: new data becomes a new compartment; existing compartments are untouched."""
    w = open_ward(ward, device=device)
    with progress_bar() as progress:
        result = w.add(data, device=device, progress=progress)
    out.print(f"added {result['samples']} samples as compartment(s) {result['compartments']}")


@app.command()
def demo(out_dir: Path = typer.Option(Path("demo-out"), "--out", help="Where the demo writes its ward and pictures."),
         quick: bool = typer.Option(False, "--quick", help="A shorter run (smaller training budget).")) -> None:
    """Show the whole product end to end on the bundled digits."""
    from dataward.app.demo import run_demo

    run_demo(out_dir, quick=quick, console=out)


# service: API keys and serve ----------------------------------------------------------------------------------------
keys_app = typer.Typer(no_args_is_help=True, help="API keys for `dataward serve`: each key reaches only its compartments.")
app.add_typer(keys_app, name="keys")


@keys_app.callback()
def _keys(ctx: typer.Context, ward: Path = typer.Argument(..., help="The ward folder.")) -> None:
    """Manage a ward's API keys: dataward keys WARD create|list|revoke."""
    ctx.ensure_object(dict)["ward"] = ward


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    allow: Optional[str] = typer.Option(None, "--allow", help="Compartments the key may use, e.g. 0,2 (or all)."),
    admin: bool = typer.Option(False, "--admin", help="The key may also forget samples (POST /v1/forget)."),
    name: Optional[str] = typer.Option(None, "--name", help="A unique name for the key (default: a random one)."),
) -> None:
    """Create a key and print it once (only its SHA-256 is stored)."""
    import secrets

    w = open_ward(ctx.obj["ward"], resume=False)
    if allow is None and not admin:
        raise DatawardError("--allow is required: the compartments the key may use, e.g. --allow 0,2 (or --allow all)")
    ids = w.compartments() if (allow or "").strip() == "all" else (parse_ids(allow) or [])
    key_id, raw = w.ledger.create_key(name or f"key-{secrets.token_hex(3)}", ids, admin)
    console.print(f"created key #{key_id} for compartments {sorted(set(ids))}{' (admin)' if admin else ''}. "
                  "Store it now: it is shown only this once.")
    print(raw)


@keys_app.command("list")
def keys_list(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the keys (names, grants, state; never the keys)."""
    import datetime

    keys = open_ward(ctx.obj["ward"], resume=False).ledger.list_keys()
    if as_json:
        print(json.dumps(keys))
        return
    table = Table()
    for col in ("id", "name", "allow", "admin", "created", "state"):
        table.add_column(col)
    for k in keys:
        created = datetime.datetime.fromtimestamp(k["created_at"]).isoformat(timespec="seconds")
        table.add_row(str(k["id"]), k["name"], ",".join(map(str, k["allow"])) or "-", "yes" if k["admin"] else "no", created,
                      "revoked" if k["revoked_at"] else "active")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key: str = typer.Argument(..., help="The key's ID or name.")) -> None:
    """Revoke a key: refused from the very next request on."""
    record = open_ward(ctx.obj["ward"], resume=False).ledger.revoke_key(key)
    out.print(f"revoked key #{record['id']} ({record['name']})")


@app.command()
def serve(
    ward: Path = typer.Argument(..., help="The ward folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (put TLS in front of anything but loopback)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    workers: int = typer.Option(2, "--workers", help="Generation pool size: generations run at once (threads in one process)."),
    queue: int = typer.Option(8, "--queue", help="Generations that may wait for a worker; beyond that: 429 with Retry-After."),
    max_n: int = typer.Option(64, "--max-n", help="Most images per request."),
    max_steps: int = typer.Option(250, "--max-steps", help="Most sampling steps per request."),
    torch_threads: int = typer.Option(1, "--torch-threads", help="torch intra-op threads per worker (keep workers x threads <= free cores)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
) -> None:
    """Serve the ward over HTTP (FastAPI + uvicorn; OpenAPI docs at /docs). See docs/service.md."""
    import uvicorn

    from dataward.app.service import ServiceLimits, create_app

    service_app = create_app(ward, pool_size=workers, queue_size=queue, limits=ServiceLimits(max_n=max_n, max_steps=max_steps),
                             torch_threads=torch_threads)
    console.print(f"serving {ward} on http://{host}:{port} ({workers} worker(s), queue {queue}); API docs at /docs")
    uvicorn.run(service_app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=int(ServiceLimits().shutdown_timeout_s))


def _print_error(message: str) -> None:
    """One unwrapped line on stderr, whatever the terminal width; the message is not read as rich markup."""
    console.print("[red]error:[/red]", escape(message), soft_wrap=True)


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 1."""
    try:
        app(standalone_mode=False)
    except DatawardError as error:
        if STATE["debug"]:
            raise
        _print_error(str(error))
        sys.exit(1)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - the CLI never shows a raw traceback unless --debug
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        if STATE["debug"]:
            raise
        _print_error(f"{type(error).__name__}: {error} (run with --debug for the traceback)")
        sys.exit(1)
