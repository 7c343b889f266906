"""Deterministic training, shared by every model the ward trains (denoisers, routers, guards, DP fine-tuning).

Training is a sequence of *stages* (SISA slices): stage r trains on slices 0..r and ends with a checkpoint holding
everything needed to continue bitwise-exactly: the raw weights, the EMA weights, Adam's state and the step counter.
Randomness comes only from a generator seeded by (seed, model, stage), and the data order from the sorted IDs of the stage,
so the same IDs, seed, config and thread count always give the same bytes.

There is one loop, :func:`train_batches`: :func:`run_steps` feeds it shuffled batches and plain Adam steps
(:class:`PlainSteps`); DP-SGD feeds it Poisson batches and its clipping, noising steps through the wrapper of
:func:`dataward.training.dp.make_private`. Losses are per sample (unreduced), so both paths share them.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Protocol

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from dataward.config import TrainConfig
from dataward.data import Dataset
from dataward.errors import DatawardError

# per_sample_loss(model, x0 (B, C, H, W), y (B,) or None, targets (B,) or None, generator) -> (B,) unreduced losses
PerSampleLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Generator], torch.Tensor]


def denoiser_loss(scheduler: DDPMScheduler) -> PerSampleLoss:
    """ε-prediction loss ||ε − ε_θ(x_t, t, y)||² per example, x_t from ``scheduler.add_noise``."""

    def loss(model, x0, y, targets, generator):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        x_t = scheduler.add_noise(x0, noise, t)
        pred = model(x_t, t, class_labels=y).sample
        return (pred - noise).pow(2).flatten(1).mean(dim=1)

    return loss


def classifier_loss(scheduler: DDPMScheduler, max_timestep: int | None = None) -> PerSampleLoss:
    """Cross-entropy of a noisy classifier on x_t = add_noise(x0, ε, t) against ``targets``."""

    def loss(model, x0, y, targets, generator):
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        high = max_timestep or scheduler.config.num_train_timesteps
        t = torch.randint(0, high, (x0.shape[0],), generator=generator).to(x0.device)
        logits = model(scheduler.add_noise(x0, noise, t), t)
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    return loss


@dataclass
class TrainState:
    """What continues training exactly: the model (raw weights), its EMA, Adam, and the global step."""

    model: torch.nn.Module
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    step: int = 0

    @classmethod
    def fresh(cls, model: torch.nn.Module, config: TrainConfig, trainable: Callable[[str], bool] | None = None) -> "TrainState":
        """A new state; ``trainable(name)`` picks the parameters Adam updates (all by default; a model built with some
        parameters frozen, e.g. an adapter on a base, keeps its own choice when ``trainable`` is None)."""
        if trainable is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(trainable(name))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise DatawardError("no trainable parameters were selected")
        optimizer = torch.optim.Adam(params, lr=config.lr, foreach=False)
        ema = EMAModel(params, decay=config.ema_decay, foreach=False)
        return cls(model, ema, optimizer, 0)

    def trained_names(self) -> list[str]:
        """The names of the parameters training changes (Adam and the EMA hold exactly these, in this order)."""
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights under the model's parameter names, plus the frozen parameters and buffers (what sampling uses)."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        for name, shadow in zip(self.trained_names(), self.ema.shadow_params):
            state[name] = shadow.detach().clone()
        return state

    def ema_model(self) -> torch.nn.Module:
        """A copy of the model holding the EMA weights, in eval mode (what samples, guides and gets saved)."""
        model = copy.deepcopy(self.model)  # (not from_config: some models are built with positional args, which it drops)
        model.load_state_dict(self.ema_state_dict())
        return model.eval()

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Raw weights (all but frozen parameters: those come from the model the training started from), EMA shadow and
        Adam state as named tensors, with the step counters as string metadata (what :meth:`save` writes)."""
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items() if k not in frozen}
        for i, shadow in enumerate(self.ema.shadow_params):
            tensors[f"ema.{i}"] = shadow.detach().contiguous()
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"adam.{index}.{key}"] = torch.as_tensor(value).contiguous()
        meta = {"step": str(self.step), "ema_step": str(self.ema.optimization_step), "param_groups": json.dumps(opt["param_groups"])}
        return tensors, meta

    def save(self, path: Path) -> None:
        """Write :meth:`tensors` to one safetensors file (no pickle)."""
        tensors, meta = self.tensors()
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: Path) -> None:
        """Restore a state written by :meth:`save` into this (freshly built) state."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        self.restore(load_file(str(path)), meta, path)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], where: object) -> None:
        """Restore :meth:`tensors` (read from the file ``where``, named in errors) into this (freshly built) state."""
        frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        if set(weights) | frozen != set(self.model.state_dict()):
            raise DatawardError(f"{where} does not hold the training state of this model (its tensors do not match the model's)")
        self.model.load_state_dict(weights, strict=False)
        for i, shadow in enumerate(self.ema.shadow_params):
            shadow.copy_(tensors[f"ema.{i}"])
        self.ema.optimization_step = int(meta["ema_step"])
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("adam."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        self.step = int(meta["step"])


class Batch(NamedTuple):
    """One (physical) batch the loop trains on."""

    x0: torch.Tensor  # (B, C, H, W) examples as the model sees them
    y: torch.Tensor | None  # (B,) class labels, or None
    targets: torch.Tensor | None  # (B,) classifier targets, or None


def finite_mean(losses: torch.Tensor, step: int) -> torch.Tensor:
    """The mean of per-sample ``losses`` (B,), refusing a non-finite one (training diverged at ``step``)."""
    loss = losses.mean()
    if not torch.isfinite(loss):
        raise DatawardError(f"training diverged at step {step}: loss is {loss.item()}")
    return loss


class Stepper(Protocol):
    """How the loop turns one batch's per-sample losses into an optimizer step: :class:`PlainSteps`, or DP-SGD
    (:class:`dataward.training.dp.PrivateTraining`, which wraps the same :class:`TrainState`)."""

    def zero_grad(self) -> None:
        """Clear the gradients of the previous batch."""

    def backward(self, per_sample_loss: PerSampleLoss, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Forward and backward of ``batch``; returns its mean loss."""

    def step(self) -> bool:
        """Step the optimizer; False when no (logical) step was taken yet."""


@dataclass
class PlainSteps:
    """Non-private steps: the state's own model and Adam on the batch's mean loss."""

    state: TrainState

    def zero_grad(self) -> None:
        """Set the gradients to None."""
        self.state.optimizer.zero_grad(set_to_none=True)

    def backward(self, per_sample_loss: PerSampleLoss, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Backward of the batch's mean per-sample loss."""
        loss = finite_mean(per_sample_loss(self.state.model, batch.x0, batch.y, batch.targets, generator), self.state.step)
        loss.backward()
        return loss

    def step(self) -> bool:
        """One Adam step (always taken)."""
        self.state.optimizer.step()
        return True


@dataclass
class StageCursor:
    """Where a stage stands between two steps: with the :class:`TrainState`, all it needs to continue bitwise."""

    done: int  # optimizer steps of the stage taken
    rows_left: torch.Tensor  # (M,) long: the rows of the current shuffle not drawn yet
    generator_state: torch.Tensor  # the stage generator's state (noise, timesteps and the next shuffles come from it)
    streams: dict[str, torch.Tensor] = field(default_factory=dict)  # other generators' states (DP: Poisson sampling, noise)
    accountant: str | None = None  # DP: the privacy accountant's state (opacus state_dict) as JSON


class ShuffledBatches:
    """``steps`` batches of ``batch`` examples of ``data`` in epoch-wise shuffles drawn from ``generator`` (lazily, so the
    draws interleave with the loss's draws from the same generator). :meth:`cursor` is where the stage stands after the
    batches given so far; started from a cursor (an in-stage checkpoint) it gives the batches that were still to come."""

    def __init__(self, data: Dataset, batch: int, steps: int, generator: torch.Generator, targets: torch.Tensor | None = None,
                 device: str = "cpu", start: StageCursor | None = None):
        self.batch, self.steps, self.generator, self.device = batch, steps, generator, device
        self.images, self.labels = data.images.to(device), None if data.labels is None else data.labels.to(device)
        self.targets = None if targets is None else targets.to(device)
        self.done, self.rows_left = 0, torch.empty(0, dtype=torch.long)
        if start is not None:
            self.done, self.rows_left = start.done, start.rows_left.clone()
            generator.set_state(start.generator_state)

    def __iter__(self) -> Iterator[Batch]:
        while self.done < self.steps:
            if len(self.rows_left) < self.batch:
                self.rows_left = torch.cat([self.rows_left, torch.randperm(len(self.images), generator=self.generator)])
            rows, self.rows_left = self.rows_left[: self.batch], self.rows_left[self.batch :]
            self.done += 1
            rows = rows.to(self.device)
            yield Batch(self.images[rows], None if self.labels is None else self.labels[rows], None if self.targets is None else self.targets[rows])

    def cursor(self) -> StageCursor:
        """Where the stage stands now (call it between steps: after a step, before the next batch is drawn)."""
        return StageCursor(self.done, self.rows_left.clone(), self.generator.get_state())


def train_batches(
    state: TrainState,
    batches: Iterable[Batch],
    per_sample_loss: PerSampleLoss,
    generator: torch.Generator,
    *,
    stepper: Stepper | None = None,
    on_step: Callable[[float], None] | None = None,
) -> None:
    """The one training loop, private or not: per batch, clear gradients, backward of the mean per-sample loss, optimizer
    step; after each step taken, the EMA update and the step counter. ``stepper`` (default :class:`PlainSteps`) is where
    DP-SGD wraps the model and optimizer; ``on_step`` gets the loss of the batch that completed the step."""
    stepper = stepper or PlainSteps(state)
    state.model.train()
    for batch in batches:
        stepper.zero_grad()
        loss = stepper.backward(per_sample_loss, batch, generator)
        if not stepper.step():
            continue  # a physical batch inside a logical one (DP-SGD): no step yet
        state.ema.step([p for p in state.model.parameters() if p.requires_grad])
        state.step += 1
        if on_step is not None:
            on_step(loss.item())


def run_steps(
    state: TrainState,
    data: Dataset,
    per_sample_loss: PerSampleLoss,
    steps: int,
    config: TrainConfig,
    generator: torch.Generator,
    targets: torch.Tensor | None = None,
    device: str = "cpu",
    on_step: Callable[[float], None] | None = None,
) -> None:
    """``steps`` Adam steps on ``data`` (epoch-wise shuffles from ``generator``); updates EMA after each step."""
    batches = ShuffledBatches(data, config.batch_for(len(data)), steps, generator, targets, device)
    train_batches(state, batches, per_sample_loss, generator, on_step=on_step)
