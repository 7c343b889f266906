"""What ``train`` will train and roughly how long, said before it starts: the plan's optimizer steps per model times
seconds per step measured on this machine (a few timed steps of each kind of model, on random inputs of its shape and
batch). An estimate: the machine's load changes it, and DP fine-tuning is not timed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from dataward.data import Dataset
from dataward.errors import DatawardError
from dataward.training.kinds import KINDS
from dataward.training.basecache import PublicModelCache
from dataward.training.loop import TrainState, run_steps
from dataward.training.planner import Lineage
from dataward.training.runner import JobRunner, configure_torch

CALIBRATION_STEPS = 3  # timed steps per kind of model and batch (after one untimed warm-up step)


@dataclass(frozen=True)
class PlannedModel:
    """One model ``train`` will train (or copy from the cache of public models)."""

    kind: str
    compartment: int | None
    stages: int  # stages to train
    steps: int | None  # optimizer steps over those stages (None: DP fine-tuning, whose steps come from its privacy plan)
    cached: bool | None  # a public model: whether the user's cache holds it (None: not a public model, or not known yet)
    seconds_per_step: float | None  # measured on this machine (None: copied from the cache, or not timed)

    @property
    def seconds(self) -> float | None:
        """The estimated training time (0 for a copy from the cache; None when not timed)."""
        if self.cached:
            return 0.0
        return None if self.steps is None or self.seconds_per_step is None else self.steps * self.seconds_per_step


@dataclass(frozen=True)
class TrainingForecast:
    """What ``train`` will train, in training order, with its estimated time."""

    models: tuple[PlannedModel, ...]
    base: str | None  # the ward's base setting (WardConfig.base): names the public denoiser "public base" when it is one

    @property
    def seconds(self) -> float:
        """The estimated time of every timed model."""
        return sum(m.seconds or 0.0 for m in self.models)

    def to_dict(self) -> dict:
        """JSON-ready: every planned model and the estimated seconds (``estimate``: measured, not promised)."""
        return {"models": [asdict(m) for m in self.models], "seconds": round(self.seconds, 1), "estimate": True}

    def describe(self) -> str:
        """One line: what will train, and about how long at the seconds per step measured here."""
        if not self.models:
            return "nothing to train: the ward is up to date"
        parts, rates, untimed = [], {}, []
        for kind in dict.fromkeys(m.kind for m in self.models):
            models = [m for m in self.models if m.kind == kind]
            parts += self._describe_kind(kind, models)
            timed = [m.seconds_per_step for m in models if m.seconds_per_step is not None]
            if timed:
                rates[self._name(kind)] = max(timed)
            untimed += sorted({"DP fine-tuning" if m.steps is None else self._name(kind) for m in models if m.seconds is None})
        rate_text = ", ".join(f"{name} {rate:.3g}" for name, rate in rates.items())
        line = f"will train: {'; '.join(parts)}. ≈ {_duration(self.seconds)}"
        if untimed:
            line += f" plus {', '.join(untimed)} (not timed)"
        if rate_text:
            line += f" (an estimate: seconds per step measured on this machine over {CALIBRATION_STEPS} steps: {rate_text})"
        return line

    def _name(self, kind: str) -> str:
        if kind == "public-denoiser":
            return "public base" if self.base is not None else "public denoiser"
        return "public autoencoder" if kind == "autoencoder" else kind

    def _describe_kind(self, kind: str, models: list[PlannedModel]) -> list[str]:
        """The announcement's parts for one kind of model."""
        name = self._name(kind)
        if KINDS[kind].public:
            cached = {True: "yes, copied", False: "no", None: "known once the autoencoder is trained"}
            return [f"{name} ({m.steps:,} steps, cached: {cached[m.cached]})" for m in models]
        dp = [m.compartment for m in models if m.steps is None]
        plain = [m for m in models if m.steps is not None]
        parts = [f"DP fine-tuning of compartment(s) {', '.join(map(str, dp))}"] if dp else []
        if plain:
            stages = sorted({m.stages for m in plain})
            stage_text = f"{stages[0]}" if len(stages) == 1 else f"{stages[0]}-{stages[-1]}"
            who = f"{len(plain)} compartment(s) x " if KINDS[kind].per_compartment else ""
            parts.append(f"{name}: {who}{stage_text} stage(s) ({sum(m.steps for m in plain):,} steps)")
        return parts


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def seconds_per_step(runner: JobRunner, lineage: Lineage, device: str) -> float | None:
    """Seconds per optimizer step of a lineage's kind of model on this machine: :data:`CALIBRATION_STEPS` timed steps of
    a fresh model on random inputs of its shape and batch (None when its objective cannot be built yet, e.g. a latent
    ward's guard before the autoencoder exists). Draws from its own generator: no byte of training changes."""
    config, kind, context = runner.config, KINDS[lineage.kind], runner.planner.context
    ids = lineage.stage_ids[-1][:lineage.config.batch_for(len(lineage.stage_ids[-1]))]
    shape = (config.channels, config.image_size, config.image_size) if kind.data == "autoencoder" else context.shape
    generator = torch.Generator().manual_seed(0)
    labels = None if config.num_classes is None else torch.randint(0, config.num_classes, (len(ids),), generator=generator)
    data = Dataset(tuple(ids), torch.rand((len(ids), *shape), generator=generator) * 2 - 1, labels, num_classes=config.num_classes)
    try:
        loss, targets = kind.objective(context, tuple(ids))
    except DatawardError:
        return None
    configure_torch(device, lineage.config.threads)
    with torch.random.fork_rng(devices=[]):
        state = TrainState.fresh(kind.build(context, 0).to(device), lineage.config)
        run_steps(state, data, loss, 1, lineage.config, generator, targets, device)  # warm-up: first-call costs
        started = time.perf_counter()
        run_steps(state, data, loss, CALIBRATION_STEPS, lineage.config, generator, targets, device)
        return (time.perf_counter() - started) / CALIBRATION_STEPS


def forecast_training(runner: JobRunner, device: str = "cpu") -> TrainingForecast:
    """What ``Ward.train`` would train now (every missing or out-of-date model, with its steps), whether each public
    model is in the user's cache, and seconds per step measured here once per kind of model and batch."""
    planner, cache, rates, models = runner.planner, PublicModelCache(), {}, []
    for lineage in planner.lineages():
        job = planner.plan(lineage)
        if job is None:
            continue
        cached = None
        if KINDS[lineage.kind].public and not (lineage.kind == "public-denoiser" and runner.config.latent and not planner.served("autoencoder")):
            cached = cache.holds(runner.public_key(lineage, device)[0])
        steps = None if lineage.dp else sum(lineage.stage_steps(r) for r in range(job.start, len(lineage.stage_ids)))
        rate_key = (lineage.kind, lineage.config.batch_for(len(lineage.stage_ids[-1])))
        if steps is not None and not cached and rate_key not in rates:
            rates[rate_key] = seconds_per_step(runner, lineage, device)
        rate = None if steps is None or cached else rates[rate_key]
        models.append(PlannedModel(lineage.kind, lineage.compartment, len(lineage.stage_ids) - job.start, steps, cached, rate))
    return TrainingForecast(tuple(models), runner.config.base)
