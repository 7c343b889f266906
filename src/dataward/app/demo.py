"""``dataward demo``: the whole product end to end on the bundled digits, with a summary at the end."""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.text import Text

from dataward.app.terminal import epsilon_delta, print_path, progress_bar
from dataward.certificate import Certificate
from dataward.config import DPConfig, GuardConfig, TrainConfig
from dataward.pictures import ForgetPicture, guard_picture
from dataward.plots import image_grid
from dataward.training.forecast import forecast_training
from dataward.ward import Ward


def run_demo(out_dir: Path, quick: bool = False, console: Console | None = None) -> dict:
    """The product end to end: a K=4 guarded ward on digits fine-tuned from a public base; train; sample; a key for {0, 1};
    forget 5 IDs and certify; DP fine-tuning of one compartment from the base; audit and report.html. Returns the key figures."""
    out_dir = Path(out_dir)
    ward_dir = out_dir / "ward"
    if ward_dir.exists():
        shutil.rmtree(ward_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(out_dir, console or Console(), quick)
    ward = _create(run, ward_dir)
    _train(run, ward)
    _sample(run, ward)
    _access_rights_and_guards(run, ward)
    victims, certificate = _forget(run, ward)
    _dp_finetune(run, ward)
    _audit(run, ward)
    return _summary(run, victims, certificate)


@dataclass
class _Run:
    """What the demo's steps share: where it writes, the console, the summary rows and the key figures."""

    out_dir: Path
    console: Console
    quick: bool
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # (step, result, where, seconds)
    figures: dict = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    last_row: float = field(default_factory=time.time)

    def step(self, title: str) -> None:
        """A step's heading."""
        self.console.rule(f"[bold]{title}")

    def done(self, name: str, result: str, where: str) -> None:
        """One summary row, with the wall time since the previous row."""
        now = time.time()
        self.rows.append((name, result, where, f"{now - self.last_row:.1f}"))
        self.last_row = now


def _create(run: _Run, ward_dir: Path) -> Ward:
    run.step("1. create a ward on digits: a public base (printed digits), 4 compartments x 2 slices fine-tuned from it, CPSample guards")
    budget = TrainConfig(epochs=16.0 if run.quick else 40.0, batch_size=64)
    # a guard must memorise ~370 random bits before it is ever confident (> 1 − α): ~100 epochs on t < 300 does that
    # here; --quick cannot afford it, so its guards are placeholders that rarely or never steer (the demo says so)
    guards = GuardConfig(epochs=10.0, batch_size=64) if run.quick else GuardConfig(epochs=100.0, batch_size=64, max_timestep=300)
    ward = Ward.create(ward_dir, "digits", compartments=4, slices=2, train=budget, router=False, guard=True, guard_settings=guards,
                       base="printed:count=1000" if run.quick else "printed:count=3000", public_train=TrainConfig(epochs=10.0 if run.quick else 40.0))
    status = ward.status()
    run.console.print(f"{status.samples} samples: " + ", ".join(f"compartment {c['id']}: {c['samples']}" for c in status.compartments))
    run.done("create", f"{status.samples} digits in 4 compartments x 2 slices; base: {ward.config.public}", str(ward_dir))
    return ward


def _train(run: _Run, ward: Ward) -> None:
    run.step("2. train the public base, then each compartment (denoiser fine-tuned from the base + guard) in isolation")
    forecast = forecast_training(ward.runner)
    run.console.print(forecast.describe(), soft_wrap=True, highlight=False, markup=False)
    run.figures["train_estimate_seconds"] = forecast.to_dict()["seconds"]
    t0 = time.time()
    with progress_bar() as progress:
        ward.train(progress=progress)
    run.figures["train_seconds"] = round(time.time() - t0, 1)
    accuracy = {c["id"]: c["guard"]["accuracy_by_t"] for c in ward.status().compartments}
    for c, by_t in accuracy.items():
        run.console.print(f"guard {c} accuracy on its random bits by t: " + ", ".join(f"t={t}: {a:.2f}" for t, a in by_t.items()))
    run.figures["guard_accuracy_t0"] = round(sum(a["0"] for a in accuracy.values()) / len(accuracy), 3)
    run.done("train", f"base + 4 denoisers + 4 guards (guard accuracy at t=0: {run.figures['guard_accuracy_t0']:.2f})",
             "models/ (one diffusers folder per model and slice)")


def _sample(run: _Run, ward: Ward) -> None:
    run.step("3. sample, composed over all compartments")
    composed = ward.sample(64, seed=0)
    image_grid(composed.images, run.out_dir / "composed.png", composed.labels, caption=composed.caption(seed=0), attribution=composed.attribution)
    share = composed.attribution.mean(0).tolist()
    run.console.print("mean attribution per compartment: " + ", ".join(f"{c}: {w:.2f}" for c, w in enumerate(share)))
    run.done("sample", f"64 samples composed with {composed.weights} weights", str(run.out_dir / "composed.png"))


def _access_rights_and_guards(run: _Run, ward: Ward) -> None:
    run.step("4. a customer whose API key is allowed only compartments {0, 1}")
    _, key = ward.ledger.create_key("demo-customer", [0, 1])
    grant = ward.ledger.key_for_hash(ward.ledger.hash_key(key))["allow"]  # what the service does with the key it is sent
    restricted = ward.sample(32, seed=1, allowed=grant)
    image_grid(restricted.images, run.out_dir / "allowed-0-1.png", restricted.labels, attribution=restricted.attribution,
               caption="a key allowed compartments {0, 1}: " + restricted.caption(seed=1))
    mass_outside = float(restricted.attribution[:, 2:].sum())
    run.console.print(f"attribution mass on compartments 2 and 3: {mass_outside} (exactly zero: they are never evaluated)")
    run.done("access rights", f"key allowed {{0, 1}}: attribution mass outside = {mass_outside}", str(run.out_dir / "allowed-0-1.png"))
    guarded = guard_picture(ward, run.out_dir / "guarded.png", n=12, seed=1)
    run.figures["guard_guided"] = round(guarded.guard_guided, 4)
    run.console.print(f"guarded sampling: the guards were confident (and steered) on {100 * guarded.guard_guided:.1f}% of their checks"
                      + (" (--quick trains guards too briefly to be confident; run without --quick for guards that steer)" if run.quick else ""))
    run.done("guarded sampling", f"12 samples unguarded and guarded (what the guard changed); guards steered {100 * guarded.guard_guided:.1f}% of sample-steps", str(run.out_dir / "guarded.png"))


def _forget(run: _Run, ward: Ward) -> tuple[list[str], Certificate]:
    run.step("5. forget 5 sample IDs")
    victims = sorted(random.Random(0).sample(list(ward.training_data().ids), 5))
    picture = ForgetPicture.before_forget(ward, victims, seed=3)
    accepted = ward.accept_forget(victims)
    run.console.print(f"request {accepted.request} in effect at once; {accepted.quarantined_models} model(s) quarantined and deleted")
    for c, state in accepted.serving_during_retraining.items():
        run.console.print(f"  compartment {c}: {state}")
    with progress_bar() as progress:
        finished = ward.finish_forget(accepted, progress=progress)
    run.figures["forget_retrain_seconds"] = round(finished.retrain_seconds, 1)
    picture.draw(ward, run.out_dir / "forgotten.png")
    run.console.print(f"each forgotten image beside its nearest samples before and after the forget: {run.out_dir / 'forgotten.png'}")
    affected = sorted({ward.ledger.sample_rows(victims)[v][0] for v in victims})
    with progress_bar() as progress:
        certificate = ward.verify(progress=progress, compartments=affected)
    run.figures["certificate_ok"] = certificate.ok
    verdict = f"certificate of compartments {', '.join(map(str, affected))} (retrained from scratch, compared bit for bit): {'OK' if certificate.ok else 'FAILED'}"
    run.console.print(verdict + " (it covers the models served now; step 6 then trains new ones, which the audit says it does not cover)")
    run.done("forget", f"5 IDs; retrain {run.figures['forget_retrain_seconds']} s vs train {run.figures['train_seconds']} s; {verdict}",
             str(run.out_dir / "forgotten.png"))
    return victims, certificate


def _dp_finetune(run: _Run, ward: Ward) -> None:
    run.step("6. DP fine-tuning of compartment 3 at ε = 10 from the public base (DP-LDM)")
    with progress_bar() as progress:
        ward.enable_dp(DPConfig(epsilon=10.0, batch=128, epochs=5 if run.quick else 10), compartments=[3], progress=progress)
    privacy = ward.privacy()["compartments"]["3"]
    run.figures["dp_epsilon"] = round(privacy["epsilon"], 3)
    dp_samples = ward.sample(32, seed=2, allowed=[3])
    image_grid(dp_samples.images, run.out_dir / "dp-compartment-3.png", dp_samples.labels,
               caption=f"DP compartment 3 ({epsilon_delta(privacy['epsilon'], privacy['delta'])}): " + dp_samples.caption(seed=2))
    run.console.print(f"compartment 3: {epsilon_delta(privacy['epsilon'], privacy['delta'])}, σ = {privacy['sigma']:.3f}, "
                      f"{100 * privacy['trainable_fraction']:.1f}% of parameters trained (attention + class embedding)")
    run.done("DP fine-tuning", f"compartment 3: {epsilon_delta(privacy['epsilon'], privacy['delta'])}, {100 * privacy['trainable_fraction']:.1f}% params trained",
             str(run.out_dir / "dp-compartment-3.png"))


def _audit(run: _Run, ward: Ward) -> None:
    run.step("7. audit: quality, replication, membership inference, forgetting, privacy")
    from dataward.audit import audit_ward
    from dataward.audit.attacks import DEFAULT_TIMESTEPS
    from dataward.audit.report import summary_rows

    report = audit_ward(ward, n=200 if run.quick else 400, steps=25, members=100 if run.quick else 200, html=run.out_dir / "report.html",
                        timesteps=(10, 50, 100, 200, 400) if run.quick else DEFAULT_TIMESTEPS,
                        progress=lambda message: run.console.print(f"[dim]audit:[/dim] {message}"))
    for name, value in summary_rows(report):
        run.console.print(f"  {name}: {value}")
    quality = report.get("quality", {})
    run.figures["fd"] = quality.get("fd")
    run.figures["cas"] = quality.get("cas")
    run.done("audit", f"FD {quality.get('fd', float('nan')):.2f}, CAS {quality.get('cas', float('nan')):.3f}" if quality.get("status") == "ok" else str(quality.get("reason")),
             str(run.out_dir / "report.html"))


def _summary(run: _Run, victims: list[str], certificate: Certificate) -> dict:
    """summary.json and the closing table."""
    run.figures["total_seconds"] = round(time.time() - run.started, 1)
    (run.out_dir / "summary.json").write_text(json.dumps({"figures": run.figures, "forgotten": victims, "certificate": certificate.to_json()}, indent=2))
    print_summary(run.console, f"dataward demo: done in {run.figures['total_seconds']} s", run.rows)
    return run.figures


def print_summary(console: Console, title: str, rows: list[tuple[str, str, str, str]]) -> None:
    """The closing summary: per (step, result, where, seconds) row, the step and its result, then where it wrote on a line
    of its own: a full path, never wrapped or cut with an ellipsis whatever the terminal's width."""
    console.rule(f"[bold]{title}")
    for step, result, where, seconds in rows:
        console.print(Text(f"{step} ({seconds} s): {result}"))
        print_path(console, where, "    ")
