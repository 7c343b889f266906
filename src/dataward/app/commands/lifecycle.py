"""Commands that build and change a ward: init, train, pretrain, guard, add, forget, verify."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from dataward.app.commands.common import check_writable, open_ward, parse_ids, training
from dataward.app.terminal import console, epsilon_delta, out, progress_bar
from dataward.errors import DatawardError


def init(
    ward: Path = typer.Argument(..., metavar="WARD", help="Folder for the new ward."),
    data: str = typer.Option("digits", "--data", help="Data source: digits, digits:subset=N, printed[:count=N], folder:PATH, npz:PATH."),
    model: Optional[str] = typer.Option(None, help="UNet preset: tiny (8x8, CPU), small (16-32 px), base (64 px, GPU); default: tiny."),
    seed: int = typer.Option(0, help="Root seed of everything the ward trains."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Images are resized to this size (default 8; mnist and "
                                             "fashion-mnist without --image-size, --model or --base: a latent ward at 32 px)."),
    compartments: int = typer.Option(1, "--compartments", "-k", help="Number of compartments K."),
    by: str = typer.Option("random", help="Assign samples to compartments by: random | label | source."),
    slices: int = typer.Option(1, help="SISA slices per compartment (forgetting retrains from the slice that held the ID)."),
    weights: str = typer.Option("density", help="Default composition weights: density (compartment-pure mixture) | router | soup (one averaged model)."),
    base: str = typer.Option("auto", help="Where every compartment starts: auto (printed digits for digits data, else none) | a public data spec to pretrain on, e.g. printed:count=3000 | a diffusers UNet2DModel folder | none."),
    adapter: str = typer.Option("full", help="What each compartment trains on the base: full (every weight) | lora:RANK (low-rank adapters, e.g. lora:8)."),
    router: bool = typer.Option(True, help="Train the joint router when K > 1."),
    guard: bool = typer.Option(False, "--guard", help="Train a CPSample guard per compartment."),
    epochs: Optional[float] = typer.Option(None, help="Training budget: epochs over each compartment's data (default 200; 30 for the "
                                           "latent mnist / fashion-mnist ward; DP fine-tuning has its own: train --dp-epochs)."),
    steps: Optional[int] = typer.Option(None, help="Training budget in optimizer steps per compartment (overrides --epochs)."),
    batch_size: int = typer.Option(128, "--batch-size", help="Training batch size."),
    numerics: str = typer.Option("portable", help="CPU kernels: portable (the same bytes on every AVX2 machine) | native (fastest; bytes tied to this CPU)."),
    ledger: Optional[str] = typer.Option(None, "--ledger", metavar="URL", help="Keep the ledger in this empty PostgreSQL database "
                                         "(postgresql://USER@HOST:PORT/DB, password in PGPASSWORD or ~/.pgpass) instead of ledger.sqlite: "
                                         "servers on several machines can share the ward."),
) -> None:
    """Create a ward from a data source."""
    from dataward.public_base import AUTO, base_summary, choose_base
    from dataward.config import TrainConfig
    from dataward.defaults import PLAIN, init_defaults
    from dataward.ward import Ward

    chosen = init_defaults(data) if image_size is None and model is None and base == AUTO else PLAIN
    w = Ward.create(ward, data, compartments=compartments, by=by, slices=slices, model=model or chosen.model, seed=seed,
                    image_size=image_size or chosen.image_size, weights=weights, router=router, guard=guard,
                    train=TrainConfig(epochs=epochs or chosen.epochs, steps=steps, batch_size=batch_size),
                    numerics=numerics, base=choose_base(base, data), adapter=adapter, ledger_url=ledger)
    if chosen.config_changes:
        w.reconfigure(**chosen.config_changes)
        out.print(f"chosen for {escape(data)}: {escape(chosen.summary)} (set --image-size, --model or --base to choose yourself)")
    status = w.status()
    out.print(f"created ward [bold]{escape(str(ward))}[/bold]: {status.samples} samples in {len(status.compartments)} compartment(s), "
              f"{slices} slice(s) each; {escape(base_summary(w.config))}. Next: dataward train {escape(str(ward))}")


def train(
    ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."),
    steps: Optional[int] = typer.Option(None, help="Override the ward's training budget: optimizer steps per compartment."),
    router_steps: Optional[int] = typer.Option(None, "--router-steps", help="Override the router's budget: optimizer steps (it sees every compartment)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    executor: str = typer.Option("local", help="local (this process) | ray (one Ray task per compartment job; pip install 'dataward[ray]')."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to use, e.g. auto (default: start a local Ray)."),
    gpus_per_job: float = typer.Option(0.0, "--gpus-per-job", help="GPUs each Ray job asks for (fractions share a GPU); needs --device cuda."),
    cpus_per_job: float = typer.Option(1.0, "--cpus-per-job", help="CPUs each Ray job asks for."),
    dp: bool = typer.Option(False, "--dp", help="Fine-tune the compartments' denoisers with DP-SGD (from the public model if pretrained)."),
    epsilon: float = typer.Option(10.0, "--epsilon", help="DP: target ε."),
    delta: Optional[float] = typer.Option(None, "--delta", help="DP: target δ (default 1/(10 N); must be < 1/N)."),
    clip: Optional[float] = typer.Option(None, "--clip", help="DP: per-sample gradient clipping norm C (default: the median per-example gradient norm on the public data; 1.0 without public pretraining)."),
    dp_batch_size: int = typer.Option(256, "--dp-batch-size", help="DP: expected logical batch size (Poisson sampling)."),
    dp_epochs: int = typer.Option(50, "--dp-epochs", help="DP: passes over each compartment's data (the denoisers' own budget is init --epochs or --steps)."),
    trainable: Optional[str] = typer.Option(None, "--trainable", help="DP: attention (DP-LDM: attention modules + class embedding; the default) | embedding (class embedding only: best at small ε or N) | full | lora (the compartment's adapter: the default and only choice in a ward with --adapter lora:RANK)."),
    accountant: str = typer.Option("prv", "--accountant", help="DP: prv | rdp."),
    dp_lr: Optional[float] = typer.Option(None, "--dp-lr", help="DP: Adam learning rate (default: 1e-2 with --trainable attention, 1e-1 with embedding, 2e-3 with full)."),
    noise_multiplicity: int = typer.Option(1, "--noise-multiplicity", help="DP: K draws of (t, noise) per example and step, averaged before clipping (DPDM): same ε, better quality, K x compute."),
    dp_compartments: Optional[str] = typer.Option(None, "--dp-compartments", help="DP: only these compartments, e.g. 3 or 0,2 (default: all)."),
    replace_dp: bool = typer.Option(False, "--replace-dp", help="DP: replace the ward's DP setting (it has one; every DP compartment retrains)."),
    report_to: str = typer.Option("csv", "--report-to", help="Loss logs: csv (each stage's loss.csv by step, in its checkpoint folder; "
                                  "followable while it trains in WARD/resume/) | none. TensorBoard is not supported."),
) -> None:
    """Train every missing or out-of-date model of the ward; Ctrl-C stops at the end of a step, and the next train resumes
    there (to the same bytes); --dp for DP fine-tuning."""
    from dataward.training.losslog import check_report_to

    check_report_to(report_to)  # before anything changes
    w = open_ward(ward, resume=False)
    options = {} if executor != "ray" else dict(ray_address=ray_address, gpus_per_job=gpus_per_job, cpus_per_job=cpus_per_job)
    with w.writer, training(w) as progress:  # the writer lock first: a refused train changes nothing (issue 35)
        _set_budget(w, "train", steps, "the denoisers' budget", "denoiser")
        _set_budget(w, "router_train", router_steps, "the router's budget", "router")
        if dp:
            from dataward.config import DPConfig
            from dataward.training.privacy import default_trainable

            config = DPConfig(epsilon=epsilon, delta=delta, clip=clip, batch=dp_batch_size, epochs=dp_epochs, trainable=trainable or default_trainable(w.config), accountant=accountant,
                               lr=dp_lr, noise_multiplicity=noise_multiplicity)
            chosen = parse_ids(dp_compartments)
            w.enable_dp(config, chosen, train=False, replace_dp=replace_dp)
        _announce_training(w, device)
        result = w.train(device=device, progress=progress, executor=executor, report_to=report_to, **options)
    out.print(f"trained in {result.seconds:.1f} s; ward is up to date")
    privacy = w.privacy()
    if privacy:
        out.print(f"privacy: ward {epsilon_delta(privacy['ward_epsilon'], privacy['ward_delta'])}; " +
                  "; ".join(f"compartment {c}: " + (v if isinstance(v, str) else f"{epsilon_delta(v['epsilon'], v['delta'])}, σ = {v['sigma']:.3f}")
                            for c, v in privacy["compartments"].items()))
        for note in privacy["notes"]:
            out.print(f"  note: {note}")


def _announce_training(w, device: str) -> None:
    """Say what ``train`` will train and about how long (steps x seconds per step measured here), before it starts."""
    from dataward.training.forecast import forecast_training

    console.print(escape(forecast_training(w.runner, device).describe()), soft_wrap=True, highlight=False)


def _say_router_retrains(w, why: str) -> None:
    """Say that the ward's router (trained on every compartment) retrains too, and on what budget."""
    if w.config.router and len(w.compartments()) > 1:
        budget = w.config.router_train
        size = f"{budget.steps} steps" if budget.steps else f"{budget.epochs:g} epochs"
        out.print(f"the router saw every compartment and retrains too ({why}; {size}, `train --router-steps` sets it)")


def _set_budget(w, field: str, steps: int | None, what: str, models: str) -> None:
    """Set a training budget in optimizer steps (``train`` or ``router_train``) and say what it retrains."""
    from dataclasses import replace

    config = getattr(w.config, field)
    if steps is None or steps == config.steps:
        return
    before = f"{config.steps} steps" if config.steps else f"{config.epochs:g} epochs"
    w.reconfigure(**{field: replace(config, steps=steps)})
    out.print(f"{what} is now {steps} steps (was {before}): every {models} trained with the old budget is out of date and "
              "retrains now (verify checks the new budget)")


def pretrain(
    ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."),
    public: str = typer.Option("printed:count=3000", "--public", help="Public data, e.g. printed:count=3000."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: the ward's public budget in epochs)."),
    latent: bool = typer.Option(False, "--latent", help="Latent diffusion: train a public autoencoder first; every model of the ward then works on its latents."),
    autoencoder_steps: Optional[int] = typer.Option(None, "--autoencoder-steps", help="With --latent: autoencoder training steps."),
    autoencoder_data: Optional[str] = typer.Option(None, "--autoencoder-data", help="With --latent: public data of the autoencoder (default strokes:count=10000)."),
    as_base: bool = typer.Option(False, "--as-base", help="Make the public denoiser the base every compartment fine-tunes from (a ward made with a base has it already)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Pretrain the public models on public data: a denoiser (and with --latent an autoencoder); compartments fine-tune from it (the base) and `train --dp` too (DP-LDM)."""
    from dataclasses import replace

    from dataward.config import TrainConfig

    w = open_ward(ward, device=device)
    trained_before = {r.metadata.get("variant", "") for r in w.served().values()}
    budget = TrainConfig(steps=steps) if steps is not None else None
    autoencoder = None if autoencoder_steps is None else replace(w.config.autoencoder, steps=autoencoder_steps)
    with training(w) as progress:
        result = w.pretrain(public, budget, device=device, progress=progress, latent=latent, autoencoder=autoencoder, autoencoder_data=autoencoder_data,
                            as_base=as_base)
    models = "the public autoencoder and latent denoiser" if latent else "the public denoiser"
    out.print(f"pretrained {models} on {public} in {result.seconds:.1f} s (recorded in the ledger as public)")
    if latent:
        shape = "x".join(map(str, w.model_shape()))
        mse = w.served("autoencoder")[None].metadata["public_reconstruction_mse"]
        out.print(f"latent space: {shape} latents; autoencoder trained on {w.config.autoencoder_data}, reconstruction MSE on it {mse:.4f}")
    if trained_before and w.models_missing():
        out.print(f"the compartments' models are out of date (trained in another space or from another public model): "
                  f"run `dataward train {ward}` to retrain them")


def guard(
    ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."),
    steps: Optional[int] = typer.Option(None, help="Guard training steps (default: the guard's epochs)."),
    nonmember_weight: Optional[float] = typer.Option(None, "--nonmember-weight", help="Weight of the calibration term that keeps a "
                                                     "guard unsure off its members (default 1; 0: the paper's guard, which also steers non-copies)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Add CPSample guards to every compartment and train them (sample with --guard)."""
    from dataclasses import replace

    w = open_ward(ward, device=device)
    changes = {"steps": steps, "nonmember_weight": nonmember_weight}
    settings = replace(w.config.guard_settings, **{k: v for k, v in changes.items() if v is not None})
    with training(w) as progress:
        result = w.enable_guards(settings, device=device, progress=progress)
    out.print(f"guards trained in {result.seconds:.1f} s; sample with: dataward sample {escape(str(ward))} --guard")


def forget(
    ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."),
    ids: Optional[list[str]] = typer.Argument(None, metavar="IDS", help="Sample IDs to forget."),
    ids_file: Optional[Path] = typer.Option(None, "--ids-file", help="A UTF-8 file with one sample ID per line, exactly as "
                                            "written (spaces included; only the line break is removed); empty lines are skipped."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    show: Optional[Path] = typer.Option(None, "--show", metavar="PNG", help="Write a picture of up to 5 forgotten images, each "
                                        "beside its nearest samples (pixel L2) before and after the forget (samples twice: slower)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Forget samples: in effect at once, then retrain what saw them from the slice before."""
    all_ids = list(ids or []) + (read_ids_file(ids_file) if ids_file else [])
    check_writable(show)
    w = open_ward(ward, resume=False)  # accept first: nothing pending or broken may delay a forget
    picture = _before_forget(w, all_ids, show)
    accepted = w.accept_forget(all_ids)
    if accepted.request is None:
        if as_json:
            print(json.dumps(asdict(accepted)))
        else:
            out.print(f"[yellow]nothing to do:[/yellow] {accepted.message}")
        return
    if not as_json:
        _say_accepted(w, accepted)
    with training(w, not as_json) as progress:
        result = w.finish_forget(accepted, device=device, progress=progress)  # also finishes earlier pending forgets
    if picture is not None:
        picture.draw(w, show)
    if as_json:
        print(json.dumps(asdict(result)))
        return
    if picture is not None:
        out.print(f"each forgotten image beside its nearest samples before and after: {escape(str(show))}")
    if result.retraining_elsewhere is not None:
        out.print(f"retraining is left to the process training this ward now: {escape(result.retraining_elsewhere)}")
    else:
        out.print(f"retrained in {result.retrain_seconds:.1f} s; state: {result.state}. Certificate: dataward verify {escape(str(ward))}")
    if not result.erased:
        out.print("[yellow]in effect, but old pages of the images stay in the ledger's files while another connection reads an older "
                  "snapshot of it: they are erased once it lets go (by the next dataward command on this ward or its running server; "
                  "`dataward status` lists the forgets not yet erased)[/yellow]")


def _before_forget(w, ids: list[str], show: Path | None):
    """With ``--show``: the samples drawn before the forget (:class:`dataward.pictures.ForgetPicture`), else None."""
    if show is None:
        return None
    from dataward.pictures import ForgetPicture

    return ForgetPicture.before_forget(w, ids)


def read_ids_file(path: Path) -> list[str]:
    """The sample IDs of an ``--ids-file``: one per line, exactly as written (only the line break, \\n or \\r\\n, is
    removed: no other stripping, no other line separators); empty lines are skipped."""
    if not path.is_file():
        raise DatawardError(f"--ids-file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatawardError(f"--ids-file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    return [line for line in lines if line]


def _say_accepted(w, accepted) -> None:
    """What an accepted forget did, before retraining starts."""
    out.print(f"forget request {accepted.request}: {len(accepted.ids)} ID(s) forgotten; in effect now "
              f"({accepted.quarantined_models} model(s) that saw them quarantined and deleted)")
    for c, state in accepted.serving_during_retraining.items():
        out.print(f"  while retraining, compartment {c}: {state}")
    if accepted.already_forgotten:
        out.print(f"  already forgotten before: {escape(', '.join(accepted.already_forgotten))}")
    _say_router_retrains(w, "it saw the forgotten IDs")
    if accepted.stale_exports:
        out.print(f"[red]exports now stale (copies outside the ward: delete them or re-export):[/red] {escape(', '.join(accepted.stale_exports))}")


def verify(ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."), device: str = typer.Option("cpu", help="cpu or cuda."),
           retrain_base: bool = typer.Option(False, "--retrain-base", help="Retrain the public base (and autoencoder) from scratch too, "
                                             "instead of checking its weights against the hash recorded when it was trained."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Forgetting certificate: retrain every compartment's models from scratch and compare weight hashes bit for bit (the
    public base saw no private data: its hash is checked against its record, unless --retrain-base)."""
    w = open_ward(ward, device=device)
    with progress_bar(not as_json) as progress:
        cert = w.verify(device=device, progress=progress, retrain_base=retrain_base)
    if as_json:
        print(json.dumps(cert.to_json()))
    else:
        table = Table(title=f"certificate: {'OK' if cert.ok else 'FAILED'} ({cert.forgotten} forgotten IDs)")
        for col in ("model", "check", "served sha256", "expected sha256", "equal", "saw forgotten"):
            table.add_column(col)
        for m in cert.models:
            name = m.kind + ("" if m.compartment is None else f" {m.compartment}")
            how = "retrained" if m.method == "retrained" else "recorded hash"
            expected = m.scratch_sha256 or m.recorded_sha256 or "-"
            table.add_row(name, how, (m.served_sha256 or "-")[:16], expected[:16], "yes" if m.equal else "NO",
                          "-" if m.saw_forgotten_ids is None else str(m.saw_forgotten_ids))
        out.print(table)
        if any(m.method == "hash-checked" for m in cert.models):
            out.print("public models (the base) saw no private data: their weights were checked against the hash recorded when they "
                      "were trained, not retrained (--retrain-base retrains them too)")
        for m in cert.models:
            if m.reason is not None:
                out.print(f"  {m.kind}: {escape(m.reason)}")
    if not cert.ok:
        raise typer.Exit(1)


def add(ward: Path = typer.Argument(..., metavar="WARD", help="The ward folder."), data: str = typer.Option(..., "--data", help="The new data source."),
        device: str = typer.Option("cpu", help="cpu or cuda.")) -> None:
    """Continual learning: new data becomes a new compartment; existing compartments are untouched."""
    w = open_ward(ward, device=device)
    _say_router_retrains(w, "it must learn the new compartment")
    with training(w) as progress:
        result = w.add(data, device=device, progress=progress)
    out.print(f"added {result.samples} samples as compartment(s) {result.compartments}")


