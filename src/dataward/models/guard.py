"""CPSample guards: a classifier on noisy inputs that overfits random bits, and the guidance that steers away from it.

Kazdan et al., *CPSample: Classifier Protected Sampling for Guarding Training Data During Diffusion* (arXiv 2409.07025).
Every training image gets a random label ``y ∈ {0, 1}`` fixed by (seed, sample ID). The guard ``p_φ(y | x_t, t)`` is
trained on ``x_t = add_noise(x_0, ε, t)`` (the same scheduler object as the denoiser) until it labels the training data
with near-certainty at small ``t``. Random labels carry no signal, so the paper expects the guard to be confident only
near the training images it memorised and uncertain (≈ 1/2) elsewhere (measured, it is not: see *Calibration*). During sampling, wherever the guard is confident
(``max_y p_φ(y | x_t) > 1 − α``) the noise prediction is pushed toward the *less* likely label:

    ε̂(x_t, t) = ε(x_t, t) − sqrt(1 − ᾱ_t) · s · ∇_{x_t} log p_φ(ŷ | x_t, t),   ŷ = argmin_y p_φ(y | x_t, t)

and ``ε̂ = ε`` where the guard is not confident. This moves ``x_t`` toward the guard's uncertainty (p = 1/2), i.e. away
from memorised training points. The formula is the paper's (its ε-space classifier guidance, Dhariwal & Nichol's
``condition_score``); the ``sqrt(1 − ᾱ_t)`` factor lives in :func:`dataward.diffusion.sampling.guide_eps`, the one place guidance
is applied, and this module returns only ``s · ∇ log p_φ(ŷ | x_t)`` (zero where not confident).

**Calibration** (issue 17): random bits alone leave a guard confident far from its members (the paper's guard on 64
digits gives max p > 0.99 to ~half the held-out digits at t <= 200), so it also steers samples that copy nothing. A
dataward guard therefore trains with a second term, ``nonmember_weight · KL(uniform ‖ p_φ(· | z_t, t))`` on non-member
images ``z``: public images (``GuardConfig.nonmembers``, never the ward's held-out split, which is the audit's judge) and
mixtures of two of its own members (``λ x_a + (1 − λ) x_b``, λ ∈ [1/4, 3/4]), which are near the data but copy neither.
The guard learns to be sure only *at* its members. ``nonmember_weight = 0`` is the paper's guard.

Deviations from the paper, all documented on the functions:

- the guard trains on ``t < max_timestep`` only (random labels cannot be learned at large ``t``), and guidance is zero
  for ``t >= max_timestep`` (the guard was never trained there, so its confidence would be meaningless);
- the confidence test is per sample (the paper's Algorithm 1 is per sample too; we state it so batched sampling is clear).

The ward trains guards like every other model: the shared deterministic trainer (:class:`dataward.training.loop.TrainState`,
:func:`dataward.training.loop.run_steps`) with :func:`dataward.training.kinds.guard_loss` (the loss and its calibration
term) and the guard labels as ``targets``; this module gives the network (:func:`build_guard`), the labels, the
confidence measures and the guidance.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from dataward.config import GuardConfig, TrainConfig, check_guidance
from dataward.data import Dataset
from dataward.diffusion.sampling import Denoiser, Guidance, guide_eps
from dataward.errors import DatawardError
from dataward.models.nets import NoisyClassifier, build_classifier, derive_seed


# The memorization testbed (issue 5): the tiny UNet trained on ``digits:subset=MEMORIZE_SUBSET`` with this config
# replicates training images when sampled unguarded (see BENCHMARKS.md, "Guarded sampling").
MEMORIZE_SUBSET = 64  # training images: digits:subset=64 (seed 0)
MEMORIZE_PRESET = TrainConfig(steps=600, batch_size=64, lr=2e-3, ema_decay=0.995)  # 600 full-batch steps (600 epochs)


def guard_labels(ids, seed: int) -> torch.Tensor:
    """Bernoulli(1/2) labels (N,) int64, one per sample ID, each a hash of (seed, ID): stable when other IDs change."""
    return torch.tensor([derive_seed("guard-label", seed, sample_id) & 1 for sample_id in ids], dtype=torch.long)


def build_guard(channels: int, seed: int, config: GuardConfig = GuardConfig()) -> NoisyClassifier:
    """A fresh two-class noisy classifier (a diffusers ModelMixin: ``save_pretrained`` folders) with weights from ``seed``."""
    return build_classifier(channels, num_classes=2, seed=seed, width=config.width, levels=config.levels, blocks_per_level=config.blocks_per_level)


def split_nonmembers(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration images, probe images): the last ``CONFIDENCE_PROBE`` public images are never trained on; they
    measure how often the guard is confident on images it has not seen (the figure ``status`` reports)."""
    if len(images) <= CONFIDENCE_PROBE:
        raise DatawardError(f"guard non-members need more than {CONFIDENCE_PROBE} images (the probe), got {len(images)}")
    return images[:-CONFIDENCE_PROBE], images[-CONFIDENCE_PROBE:]


@torch.no_grad()
def _probabilities_by_t(guard: torch.nn.Module, images: torch.Tensor, scheduler: DDPMScheduler, timesteps, generator: torch.Generator,
                        batch_size: int = 512) -> dict[int, torch.Tensor]:
    """p_φ(· | x_t, t) (N, 2) at each timestep t, on x_t = add_noise(x_0, ε, t) with ε from ``generator``."""
    guard.eval()
    device = next(guard.parameters()).device
    out: dict[int, torch.Tensor] = {}
    for t in timesteps:
        parts = []
        for start in range(0, len(images), batch_size):
            x0 = images[start : start + batch_size]
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            tt = torch.full((x0.shape[0],), int(t), dtype=torch.long)
            parts.append(guard(scheduler.add_noise(x0, noise, tt).to(device), tt.to(device)).float().softmax(dim=1).cpu())
        out[int(t)] = torch.cat(parts)
    return out


def guard_accuracy_by_t(
    guard: torch.nn.Module,
    data: Dataset,
    labels: torch.Tensor,
    scheduler: DDPMScheduler,
    timesteps,
    generator: torch.Generator,
    batch_size: int = 512,
) -> dict[int, float]:
    """Accuracy of ``guard`` on ``labels`` at each timestep t, on x_t = add_noise(x_0, ε, t) with ε from ``generator``."""
    if labels.shape != (len(data),):
        raise DatawardError(f"labels must have one entry per image ({len(data)}), got {tuple(labels.shape)}")
    probabilities = _probabilities_by_t(guard, data.images, scheduler, timesteps, generator, batch_size)
    return {t: float((p.argmax(dim=1) == labels).float().mean()) for t, p in probabilities.items()}


def guard_confidence_by_t(guard: torch.nn.Module, images: torch.Tensor, alpha: float, scheduler: DDPMScheduler, timesteps,
                          generator: torch.Generator) -> dict[int, float]:
    """The share of ``images`` on which the guard is confident enough to steer (max_y p_φ(y | x_t, t) > 1 − α) at each t.
    On members it is how often the guard protects; on non-members (public images) it is its false-positive share."""
    check_guidance(0.0, alpha)
    probabilities = _probabilities_by_t(guard, images, scheduler, timesteps, generator)
    return {t: float((p.max(dim=1).values > 1.0 - alpha).float().mean()) for t, p in probabilities.items()}


# timesteps at which a trained guard's accuracy on its own random bits is recorded (issue 5: "how accuracy varies with t")
ACCURACY_TIMESTEPS = (0, 100, 200, 300, 400, 500)
CONFIDENCE_PROBE = 200  # public images held out of the calibration: the guard's false-positive share is measured on them


class GuardActivity:
    """Counts how often guards were confident enough to guide: one check per (sample, step, compartment) below the
    guard's ``max_timestep``. ``share`` is the guided fraction (None before any check)."""

    def __init__(self) -> None:
        self.checked = 0
        self.guided = 0

    def __call__(self, confident: torch.Tensor) -> None:
        self.checked += int(confident.numel())
        self.guided += int(confident.sum())

    @property
    def share(self) -> float | None:
        """Guided checks / all checks."""
        return self.guided / self.checked if self.checked else None


def guard_guidance(
    guard: torch.nn.Module, scale: float, alpha: float, max_timestep: int | None = None, activity: GuardActivity | None = None
) -> Guidance:
    """The CPSample guidance callable ``grad_log_p(x_t, t) -> (N, C, H, W)`` for :func:`dataward.diffusion.sampling.sample_loop`.

    For each sample with ``max_y p_φ(y | x_t, t) > 1 − alpha`` it returns ``scale · ∇_{x_t} log p_φ(ŷ | x_t, t)`` with
    ``ŷ`` the less likely label; zero for the others, and zero for every sample when ``t >= max_timestep`` (None: all t).
    The loop turns it into ε̂ = ε − sqrt(1 − ᾱ_t) · (this) in :func:`dataward.diffusion.sampling.guide_eps`.
    One forward pass without gradients finds the confident samples; the gradient is taken (with gradients enabled here,
    since the loop runs under ``no_grad``) on those samples only. The guard must treat samples independently (GroupNorm,
    no BatchNorm), which the NoisyClassifier does, so one backward pass gives every per-sample gradient.
    ``activity``, if given, is told which samples were confident at each guided step.
    """
    check_guidance(scale, alpha)
    guard.eval()

    def grad_log_p(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x_t)
        if max_timestep is not None and int(t.max()) >= max_timestep:
            return out
        with torch.no_grad():
            confident = torch.log_softmax(guard(x_t, t).float(), dim=1).max(dim=1).values.exp() > 1.0 - alpha  # (N,)
        if activity is not None:
            activity(confident)
        rows = confident.nonzero().squeeze(1)
        if len(rows):  # the gradient only where the guard is confident: a calibrated guard rarely is
            with torch.enable_grad():
                x = x_t[rows].detach().requires_grad_(True)
                log_p = torch.log_softmax(guard(x, t[rows] if t.ndim else t).float(), dim=1)
                y_hat = log_p.argmin(dim=1)  # the less likely label
                (grad,) = torch.autograd.grad(log_p.gather(1, y_hat[:, None]).sum(), x)
            out[rows] = scale * grad.to(x_t.dtype)
        return out

    return grad_log_p


def guarded(eps: Denoiser, guidance: Guidance, alpha_bar: torch.Tensor) -> Denoiser:
    """A denoiser whose ε is guided by ``guidance`` (via :func:`dataward.diffusion.sampling.guide_eps`): one compartment's ε_i
    guided by its own guard, before the mixture. ``alpha_bar`` is the sampling scheduler's ``alphas_cumprod``."""

    def eps_guarded(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            e = eps(x_t, t, y)
        return guide_eps(e, x_t, t, guidance, alpha_bar)

    return eps_guarded
