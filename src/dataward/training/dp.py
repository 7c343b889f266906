"""DP-SGD as a wrapper around the one training loop (opacus ``make_private``; DP-LDM, DPDM).

Privacy is a wrapper, not a fork. The model, optimizer and EMA live in the same :class:`~dataward.training.loop.TrainState`
as every other model; :func:`make_private` wraps the model (per-sample gradients), the optimizer (clip to ``C``, add
Gaussian noise ``sigma * C``) and a data loader (Poisson sampling at rate ``q``) with opacus ``PrivacyEngine.make_private``.
The result, :class:`PrivateTraining`, is a :class:`~dataward.training.loop.Stepper` and a source of batches, so
:func:`dataward.training.loop.train_batches` (the loop ``run_steps`` runs) trains privately with the unreduced per-sample
loss the non-private trainer uses (:func:`dataward.training.loop.denoiser_loss`). Checkpoints are ``TrainState.save`` as
usual. With ``noise_multiplicity`` K > 1 (DPDM's noise multiplicity) each example's loss averages K draws of (t, noise)
before its gradient is clipped: the same ε for K times the compute, and a clipped gradient that carries more signal
(:func:`backward_per_example`).

Per-sample gradients: opacus's default ``hooks`` grad sampler for ``Conv2d`` unfolds its input with ``as_strided``
assuming an NCHW-contiguous tensor; in a diffusers UNet the activations that leave an attention block are not, and the
per-sample gradients of the following convolutions come out wrong (all zero). In ``hooks`` mode we make every trainable
convolution's input contiguous first (a forward pre-hook, removed by :meth:`PrivateTraining.close`); ``functorch`` mode
(vmap per layer) is right as is. ``tests/test_privacy.py`` checks both against single-sample backward passes.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Protocol

import torch
from diffusers import DDPMScheduler
from torch.utils.data import DataLoader, TensorDataset

from dataward.config import DPConfig, TrainConfig, Trainable
from dataward.data import Dataset
from dataward.errors import DatawardError
from dataward.models.nets import derive_seed
from dataward.training.loop import Batch, PerSampleLoss, StageCursor, TrainState, denoiser_loss, finite_mean, train_batches
from dataward.training.privacy import (
    CLIP_CALIBRATION_EXAMPLES, CLIP_WITHOUT_PUBLIC_DATA, DPPlan, PrivacyRecord, plan_dp, trainable_filter,
)


def calibrate_clip(model: torch.nn.Module, public: Dataset, trainable: Trainable, scheduler: DDPMScheduler, *, seed: int,
                   examples: int = CLIP_CALIBRATION_EXAMPLES) -> float:
    """The median per-example gradient norm of the denoiser loss over the ``trainable`` parameters of ``model``, on
    ``examples`` PUBLIC examples: a clipping norm C matched to the model, at no privacy cost. C far above the per-example
    norms adds noise σ C that no gradient needs (here the attention modules' gradients are ~15x smaller than the whole
    model's); C far below them throws the gradients' size away. Deterministic in ``seed``."""
    probe = copy.deepcopy(model).requires_grad_(True).train()
    keep = trainable_filter(trainable)
    params = [p for name, p in probe.named_parameters() if keep(name)]
    generator = torch.Generator().manual_seed(derive_seed(seed, "dp-clip"))
    rows = torch.randperm(len(public), generator=generator)[:examples]
    device = params[0].device
    images, labels = public.images[rows].to(device), None if public.labels is None else public.labels[rows].to(device)
    loss = denoiser_loss(scheduler)
    norms = []
    for i in range(len(rows)):
        y = None if labels is None else labels[i : i + 1]
        grads = torch.autograd.grad(loss(probe, images[i : i + 1], y, None, generator).sum(), params)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    clip = float(torch.stack(norms).median())
    if not (math.isfinite(clip) and clip > 0):
        raise DatawardError(f"cannot calibrate the clipping norm on the public data (median gradient norm {clip}): pass clip explicitly")
    return clip


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(),) + tuple(args[1:])


@dataclass
class PrivateTraining:
    """A :class:`TrainState` wrapped for DP-SGD: per-sample-gradient model, clipping/noising optimizer, Poisson loader.

    ``state`` is the unwrapped state: its model, Adam and EMA are what :meth:`TrainState.save` writes. As a
    :class:`~dataward.training.loop.Stepper` it is what :func:`~dataward.training.loop.train_batches` steps with.
    """

    state: TrainState
    module: torch.nn.Module  # opacus GradSampleModule around state.model
    optimizer: torch.optim.Optimizer  # opacus DPOptimizer around state.optimizer
    loader: DataLoader  # opacus DPDataLoader: Poisson sampling at plan.sample_rate
    engine: object  # opacus PrivacyEngine (holds the accountant)
    config: DPConfig
    plan: DPPlan
    handles: list = field(default_factory=list)  # forward pre-hooks of the contiguity fix
    resumed_sampling: torch.Tensor | None = None  # a resumed stage's Poisson sampling generator state, set by batches()

    def batches(self, device: str = "cpu", done: int = 0) -> Iterator[Batch]:
        """``config.epochs`` passes of Poisson logical batches, split into physical batches of at most
        ``max_physical_batch`` (opacus BatchMemoryManager); B varies, and may be 0. ``done``: logical steps taken
        already (a resumed stage, its sampling generator restored by :meth:`resume`): only the batches still to come."""
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        per_epoch = self.plan.steps_per_epoch
        sampler = self.loader.batch_sampler  # opacus UniformWithReplacementSampler: draws `steps` batches per pass
        resumed, self.resumed_sampling = self.resumed_sampling, None
        try:
            with BatchMemoryManager(data_loader=self.loader, max_physical_batch_size=self.config.max_physical_batch, optimizer=self.optimizer) as loader:
                for epoch in range(done // per_epoch, self.config.epochs):
                    within = max(done - epoch * per_epoch, 0)
                    sampler.steps = per_epoch - within
                    if resumed is not None and within == 0:  # stopped between two passes
                        sampler.generator.set_state(resumed)
                        resumed = None
                    one_pass = iter(loader)  # draws the DataLoader's (unused) worker seed from the sampling generator
                    if resumed is not None:  # stopped inside a pass: after that draw, as the uninterrupted run
                        sampler.generator.set_state(resumed)
                        resumed = None
                    for batch in one_pass:
                        yield Batch(batch[0].to(device), batch[1].to(device) if len(batch) > 1 else None, None)
        finally:
            sampler.steps = per_epoch

    def cursor(self, generator: torch.Generator) -> StageCursor:
        """Where the training stands between two logical steps: the steps taken, the loss ``generator``'s state, the
        Poisson sampling and noise generators' states and the accountant's state (its history of steps)."""
        if self.config.secure_rng:
            raise DatawardError("DP training with secure_rng cannot be checkpointed: its random numbers cannot be saved")
        streams = {"sampling": self.loader.batch_sampler.generator.get_state(), "noise": self.optimizer.generator.get_state()}
        return StageCursor(self.state.step, torch.empty(0, dtype=torch.long), generator.get_state(), streams,
                           json.dumps(self.engine.accountant.state_dict()))

    def resume(self, cursor: StageCursor, generator: torch.Generator) -> None:
        """Continue from :meth:`cursor` (the state itself is restored by the checkpoint): the generators and the
        accountant, so the remaining steps and the ε are those of an uninterrupted run."""
        generator.set_state(cursor.generator_state)
        self.resumed_sampling = cursor.streams["sampling"]  # restored by batches(), where the pass stands
        self.optimizer.generator.set_state(cursor.streams["noise"])
        saved = json.loads(cursor.accountant)
        self.engine.accountant.load_state_dict({"history": [tuple(h) for h in saved["history"]], "mechanism": saved["mechanism"]})
        if self.engine.accountant.history and sum(h[2] for h in self.engine.accountant.history) != cursor.done:
            raise DatawardError(f"the DP checkpoint's accountant counts {sum(h[2] for h in self.engine.accountant.history)} steps, its state {cursor.done}")

    def zero_grad(self) -> None:
        """Clear ``grad_sample`` (and, after a logical step, the accumulated clipped sum) and the gradients."""
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, per_sample_loss: PerSampleLoss, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Per-example gradients of one physical batch (:func:`backward_per_example`); an empty Poisson batch gets zero
        per-example gradients, so its logical step is pure noise. Returns the mean loss (0 for an empty batch)."""
        if batch.x0.shape[0] == 0:
            for p in self.trainable_parameters():
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            return torch.zeros(())
        return backward_per_example(self, per_sample_loss, batch.x0, batch.y, generator)

    def step(self) -> bool:
        """Clip, accumulate and, at the end of a logical batch, noise and step; False inside a logical batch."""
        self.optimizer.step()
        return not self.optimizer._is_last_step_skipped  # opacus has no public accessor for it

    def record(self, **extra) -> PrivacyRecord:
        """The accounting so far: the engine's accountant state plus the DP-SGD parameters."""
        history = tuple((float(s), float(q), int(k)) for s, q, k in self.engine.accountant.state_dict()["history"])
        return PrivacyRecord(
            accountant=self.config.accountant,
            history=history,
            delta=self.plan.delta,
            clip=float(self.config.clip),
            target_epsilon=float(self.config.epsilon),
            n_examples=self.plan.n_examples,
            expected_batch=self.plan.n_examples * self.plan.sample_rate,
            epochs=self.config.epochs,
            trainable=self.config.trainable,
            trainable_params=self.plan.trainable_params,
            total_params=self.plan.total_params,
            grad_sample_mode=self.config.grad_sample_mode,
            secure_rng=self.config.secure_rng,
            noise_multiplicity=self.config.noise_multiplicity,
            extra=dict(extra),
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters DP-SGD updates (they carry ``grad_sample`` after a backward pass)."""
        return [p for p in self.state.model.parameters() if p.requires_grad]

    def close(self) -> None:
        """Clear the last step's gradients and remove opacus's hooks and ours from ``state.model`` (a plain module again)."""
        self.optimizer.zero_grad(set_to_none=True)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.module._close()  # opacus GradSampleModule's own hook removal (no public name)
        for p in self.state.model.parameters():
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)


def _dataset(data: Dataset) -> TensorDataset:
    if data.labels is None:
        return TensorDataset(data.images)
    return TensorDataset(data.images, data.labels)


def make_private(state: TrainState, data: Dataset, config: DPConfig, *, seed: int, plan: DPPlan | None = None) -> PrivateTraining:
    """Wrap ``state``'s model and optimizer and a loader over ``data`` with opacus ``PrivacyEngine.make_private``.

    ``state`` must come from ``TrainState.fresh(model, train_config, trainable_filter(config.trainable))`` so Adam holds
    exactly the trainable parameters. With ``secure_rng`` off, Poisson sampling and the DP noise draw from generators
    seeded by ``seed``, so two runs are bitwise equal. A ``clip`` of None means 1.0 here (nothing to calibrate on).
    """
    from opacus import PrivacyEngine

    plan = plan or plan_dp(config, len(data), state.model)
    if config.clip is None:  # nothing to calibrate on here (dp_finetune calibrates on public data before it calls this)
        config = replace(config, clip=CLIP_WITHOUT_PUBLIC_DATA)
    keep = trainable_filter(config.trainable)
    wrong = [n for n, p in state.model.named_parameters() if p.requires_grad != keep(n)]
    if wrong:
        raise DatawardError(f"the train state's trainable parameters do not match trainable={config.trainable!r} (e.g. {wrong[0]})")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_rng)
    sampling = None if config.secure_rng else torch.Generator().manual_seed(derive_seed(seed, "dp-poisson"))
    noise = None if config.secure_rng else torch.Generator().manual_seed(derive_seed(seed, "dp-noise"))
    loader = DataLoader(_dataset(data), batch_size=config.batch, shuffle=False, generator=sampling)
    state.model.train()  # opacus refuses eval-mode models
    handles = []
    if config.grad_sample_mode == "hooks":
        for module in state.model.modules():
            if isinstance(module, torch.nn.Conv2d) and any(p.requires_grad for p in module.parameters(recurse=False)):
                handles.append(module.register_forward_pre_hook(_contiguous_input))
    module, optimizer, dp_loader = engine.make_private(
        module=state.model,
        optimizer=state.optimizer,
        data_loader=loader,
        noise_multiplier=plan.sigma,
        max_grad_norm=config.clip,
        poisson_sampling=True,
        noise_generator=noise,
        grad_sample_mode=config.grad_sample_mode,
        loss_reduction="mean",
    )
    if abs(optimizer.expected_batch_size - int(plan.n_examples * plan.sample_rate)) > 0 or len(dp_loader) != plan.steps_per_epoch:
        raise AssertionError("opacus derived a different sampling rate than the plan")  # guards the accounting
    return PrivateTraining(state, module, optimizer, dp_loader, engine, config, plan, handles)


def backward_per_example(private: PrivateTraining, per_sample_loss: PerSampleLoss, x0: torch.Tensor, y: torch.Tensor | None,
                         generator: torch.Generator) -> torch.Tensor:
    """Forward and backward of one physical batch x0 (B, C, H, W): afterwards each trainable parameter's ``grad_sample``
    (B, ...) holds example i's gradient of its loss averaged over ``noise_multiplicity`` K draws of (t, noise) (DPDM's
    noise multiplicity: the K draws of one example are rows i K .. i K + K - 1, folded before clipping, so the privacy unit
    stays the example and ε does not change). Returns the mean loss."""
    k = private.config.noise_multiplicity
    rows = x0.repeat_interleave(k, dim=0)  # (B K, C, H, W)
    losses = per_sample_loss(private.module, rows, None if y is None else y.repeat_interleave(k, dim=0), None, generator)
    loss = finite_mean(losses, private.state.step)
    with warnings.catch_warnings():  # the class embedding's integer input: harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward()  # opacus: grad_sample (B K, ...), row j = the gradient of row j's loss
    if k > 1:
        for p in private.trainable_parameters():
            p.grad_sample = p.grad_sample.view(-1, k, *p.shape).mean(dim=1)  # (B, ...)
    return loss


def run_private_epochs(
    private: PrivateTraining,
    per_sample_loss: PerSampleLoss,
    generator: torch.Generator,
    *,
    device: str = "cpu",
    on_step: Callable[[float], None] | None = None,
) -> PrivacyRecord:
    """``config.epochs`` passes of DP-SGD through the one loop (:func:`~dataward.training.loop.train_batches`): the
    wrapper's Poisson batches and steps, the same per-sample loss, Adam and EMA as ``run_steps``.

    ``on_step`` gets the mean loss of the last physical batch: it is computed on private data and is NOT covered
    by ε, so show it locally and never publish it. Returns the :class:`PrivacyRecord`.
    """
    train_batches(private.state, private.batches(device), per_sample_loss, generator, stepper=private, on_step=on_step)
    return private.record()


class StepSaving(Protocol):
    """An in-stage checkpoint and when to write it (:class:`dataward.training.resume.CheckpointedSteps`)."""

    def load(self, state: TrainState) -> StageCursor | None:
        """Restore ``state`` from the checkpoint and return its cursor, or None."""

    def after_step(self, state: TrainState, cursor: Callable[[], StageCursor], done: int) -> None:
        """After step ``done``: save ``cursor()`` when due; deliver a pending signal."""


def dp_finetune(
    model: torch.nn.Module,
    private: Dataset,
    config: DPConfig,
    train: TrainConfig,
    *,
    seed: int,
    scheduler: DDPMScheduler,
    calibration: Dataset | None = None,
    device: str = "cpu",
    on_step: Callable[[float], None] | None = None,
    saving: StepSaving | None = None,
    **extra,
) -> tuple[TrainState, PrivacyRecord]:
    """DP-SGD fine-tuning of ``model`` (public-pretrained: DP-LDM; freshly built: DP from scratch, DPDM-style) on the
    ``private`` data. Validates everything before training. ``train`` gives EMA decay and threads; ``calibration`` is
    PUBLIC data (as the model sees it) that sets the clipping norm when ``config.clip`` is None (:func:`calibrate_clip`;
    without it C = 1); ``saving``: an in-stage checkpoint to continue from and to save after steps (its state, generators
    and accountant: the same bytes and ε as an uninterrupted run; not with ``secure_rng``); ``extra`` goes into the record
    (e.g. ``public="printed:count=3000"``). Returns the trained state and its :class:`PrivacyRecord`.
    """
    if private.num_classes is not None and getattr(model.config, "num_class_embeds", None) not in (None, private.num_classes):
        raise DatawardError(f"the model has {model.config.num_class_embeds} class embeddings but the private data has {private.num_classes} classes")
    if saving is not None and config.secure_rng:
        raise DatawardError("DP training with secure_rng cannot be checkpointed: its random numbers cannot be saved")
    plan = plan_dp(config, len(private), model)
    if config.clip is None:  # without calibration data make_private applies the default
        if calibration is not None:
            config = replace(config, clip=calibrate_clip(model, calibration, config.trainable, scheduler, seed=seed))
        extra["clip_calibrated_on"] = "public data (median per-example gradient norm)" if calibration is not None else f"nothing (default {CLIP_WITHOUT_PUBLIC_DATA})"
    extra["lr"] = config.learning_rate()
    state = TrainState.fresh(model, replace(train, lr=config.learning_rate()), trainable_filter(config.trainable))
    start = None if saving is None else saving.load(state)
    wrapped = make_private(state, private, config, seed=seed, plan=plan)
    try:
        generator = torch.Generator().manual_seed(derive_seed(seed, "dp-loss"))
        if start is not None:
            wrapped.resume(start, generator)

        def step_done(value: float) -> None:
            if on_step is not None:
                on_step(value)
            if saving is not None:
                saving.after_step(state, lambda: wrapped.cursor(generator), state.step)

        train_batches(state, wrapped.batches(device, 0 if start is None else start.done), denoiser_loss(scheduler), generator,
                      stepper=wrapped, on_step=step_done)
        record = wrapped.record(**extra)
    finally:
        wrapped.close()
    return state, record
