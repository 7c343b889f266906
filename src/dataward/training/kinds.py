"""The kinds of model a ward trains, one :class:`ModelKind` each: how to build one, what it learns, what it trains on.

============== ================ ========================= ===================================================
kind           one per          trains on                 learns
============== ================ ========================= ===================================================
autoencoder    ward (public)    ``autoencoder_data``      to encode images to latents (latent wards)
public-denoiser ward (public)   ``public``                ε on public data: the start of DP fine-tuning
denoiser       compartment      the compartment's data    ε: the compartment's model
guard          compartment      the compartment's data    random bits of its training images (CPSample)
router         ward             every compartment         which compartment x_t came from (CDM weights)
============== ================ ========================= ===================================================

The kind's name is what the ledger, the checkpoint folders and the seeds use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel

from dataward.config import GuardConfig, WardConfig
from dataward.data import Dataset
from dataward.diffusion.latent import LatentCodec, autoencoder_loss, latent_scaling_factor
from dataward.errors import DatawardError
from dataward.models.guard import ACCURACY_TIMESTEPS, build_guard, guard_accuracy_by_t, guard_confidence_by_t, guard_labels, split_nonmembers
from dataward.models.nets import NoisyClassifier, build_autoencoder, build_classifier, build_unet, derive_seed
from dataward.store.ledger import Ledger
from dataward.training.loop import PerSampleLoss, TrainState, classifier_loss, denoiser_loss

DataName = Literal["compartment", "public", "autoencoder"]


@dataclass(frozen=True)
class KindContext:
    """What a model kind needs from its ward."""

    config: WardConfig
    scheduler: DDPMScheduler  # the training scheduler: every kind on noisy inputs adds noise with it
    shape: tuple[int, int, int]  # (C, H, W) the models see: the images, or the latents of a latent ward
    ledger: Ledger  # the compartments and which one holds a sample (the router's outputs and targets)
    public_inputs: Callable[[str], torch.Tensor]  # a public data spec -> its images as the models see them (latents in a latent ward)

    @property
    def compartments(self) -> list[int]:
        """Every compartment ID in order: the router's output columns."""
        return self.ledger.compartments()


Objective = tuple[PerSampleLoss, torch.Tensor | None]  # the per-sample loss and the targets, one per training ID (or None)


@dataclass(frozen=True)
class ModelKind:
    """One kind of model: its network, its objective, its data and how it is recorded."""

    name: str
    model_class: type  # the diffusers class its checkpoint folders load with
    public: bool  # trained on public data only: recorded as public, never retrained by a forget
    per_compartment: bool  # one per compartment (else one per ward)
    wave: int  # training order: later waves need earlier ones (latents need the autoencoder, DP the public denoiser)
    data: DataName  # the compartment's samples (all compartments' for a ward-wide kind), or a public data set
    latent_space: bool  # works on the latents in a latent ward
    build: Callable[[KindContext, int], torch.nn.Module]  # (context, seed) -> a freshly initialized network
    objective: Callable[[KindContext, tuple[str, ...]], Objective]  # (context, sorted training IDs) -> loss and targets
    # (context, trained state, data, targets, stage) -> extra metadata of a trained stage
    describe: Callable[[KindContext, TrainState, Dataset, torch.Tensor | None, int], dict] = lambda *_: {}
    structure: Callable[[KindContext], dict] = lambda _: {}  # metadata a checkpoint must match to fit the ward now

    def fits(self, metadata: dict, context: KindContext) -> bool:
        """Whether a checkpoint's metadata fits the ward as it is now (the router: as many outputs as compartments)."""
        return all(metadata.get(key) == value for key, value in self.structure(context).items())


def _unet(context: KindContext, seed: int) -> torch.nn.Module:
    channels, size, _ = context.shape
    return build_unet(context.config.model, size, channels, context.config.num_classes, seed)


def _denoising(context: KindContext, ids: tuple[str, ...]) -> Objective:
    return denoiser_loss(context.scheduler), None


def _router_objective(context: KindContext, ids: tuple[str, ...]) -> Objective:
    column = {c: i for i, c in enumerate(context.compartments)}
    rows = context.ledger.sample_rows(list(ids))
    return classifier_loss(context.scheduler), torch.tensor([column[rows[i][0]] for i in ids])


# ---------------------------------------------------------------------------------------------------------------------
# The guard's objective: the noisy classifier's loss on its random bits, and the calibration term (dataward.models.guard)


def guard_loss(scheduler: DDPMScheduler, config: GuardConfig = GuardConfig(), nonmembers: torch.Tensor | None = None) -> PerSampleLoss:
    """Per-example cross-entropy on x_t = scheduler.add_noise(x_0, ε, t), t uniform in [0, max_timestep), plus (when
    ``config.nonmember_weight > 0``) the calibration term on non-member images: per batch of n members, n / CALIBRATION_SHARE
    drawn from ``nonmembers`` (public images as the guard sees them) and as many mixtures of two different members of the
    batch (see *Calibration* in :mod:`dataward.models.guard`)."""
    if config.max_timestep > scheduler.config.num_train_timesteps:
        raise DatawardError(
            f"guard max_timestep {config.max_timestep} exceeds the scheduler's num_train_timesteps {scheduler.config.num_train_timesteps}"
        )
    members_loss = classifier_loss(scheduler, config.max_timestep)
    if not config.nonmember_weight:
        return members_loss
    if nonmembers is None or len(nonmembers) == 0:
        raise DatawardError("a calibrated guard (nonmember_weight > 0) needs non-member images: set GuardConfig.nonmembers")

    def loss(model, x0, y, targets, generator):
        own = members_loss(model, x0, y, targets, generator)
        n = x0.shape[0]
        k = max(1, n // CALIBRATION_SHARE)  # a quarter of a batch of each kind: half a batch more to classify per step
        public = nonmembers[torch.randint(0, len(nonmembers), (k,), generator=generator)].to(x0.device)
        order = torch.randperm(n, generator=generator).to(x0.device)  # pairs (order[i], order[i - 1]): two different members
        share = 0.25 + 0.5 * torch.rand(k, *([1] * (x0.ndim - 1)), generator=generator).to(x0.device)
        mixed = share * x0[order[:k]] + (1 - share) * x0[order.roll(1)[:k]]
        z = torch.cat([public, mixed]) if n > 1 else public
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(x0.device)
        t = torch.randint(0, config.max_timestep, (len(z),), generator=generator).to(x0.device)
        log_p = torch.log_softmax(model(scheduler.add_noise(z, noise, t), t).float(), dim=1)
        off_uniform = -log_p.mean(dim=1) - math.log(log_p.shape[1])  # KL(uniform ‖ p) >= 0, zero at p = 1/2
        return own + config.nonmember_weight * off_uniform.mean()

    return loss


CALIBRATION_SHARE = 4  # per batch of n members, n / 4 public images and n / 4 blends: on the testbed as calibrated as n + n
# (public false positives 0.00-0.01, held-out 0.25-0.27 vs 0.31) at half the training time (17 vs 33 s; the paper's guard 12 s)


def guard_model(state: TrainState) -> NoisyClassifier:
    """A copy of the trained guard holding the EMA weights, in eval mode (what guides sampling and gets saved)."""
    return state.ema_model().requires_grad_(False)


def _guard_objective(context: KindContext, ids: tuple[str, ...]) -> Objective:
    settings = context.config.guard_settings
    nonmembers = split_nonmembers(context.public_inputs(settings.nonmembers))[0] if settings.nonmember_weight else None
    return guard_loss(context.scheduler, settings, nonmembers), guard_labels(list(ids), context.config.seed)


def _by_t(values: dict[int, float]) -> dict[str, float]:
    return {str(t): round(v, 4) for t, v in values.items()}


def _guard_summary(context: KindContext, state: TrainState, data: Dataset, labels: torch.Tensor | None, stage: int) -> dict:
    """A guard's accuracy on its own random bits by timestep, and how often it is confident enough to steer (at the
    ward's α) on its members and on public images it never trained on (EMA weights, as it guides sampling)."""
    settings, guard, seed = context.config.guard_settings, guard_model(state), context.config.seed
    accuracy = guard_accuracy_by_t(guard, data, labels, context.scheduler, ACCURACY_TIMESTEPS,
                                   torch.Generator().manual_seed(derive_seed(seed, "guard-accuracy", stage)))
    probe = split_nonmembers(context.public_inputs(settings.nonmembers))[1]
    confident = {name: guard_confidence_by_t(guard, images, settings.alpha, context.scheduler, ACCURACY_TIMESTEPS,
                                             torch.Generator().manual_seed(derive_seed(seed, "guard-confidence", stage)))
                 for name, images in (("members", data.images), ("public", probe))}
    return {"accuracy_by_t": _by_t(accuracy), "alpha": settings.alpha, "confident_members_by_t": _by_t(confident["members"]),
            "confident_public_by_t": _by_t(confident["public"]), "public_probe": f"{settings.nonmembers} (last {len(probe)})"}


def _autoencoder_summary(context: KindContext, state: TrainState, public: Dataset, targets: torch.Tensor | None, stage: int) -> dict:
    """The trained autoencoder's latent scaling factor and reconstruction error on its public data."""
    config = context.config.autoencoder
    autoencoder = state.ema_model()
    codec = LatentCodec(autoencoder, latent_scaling_factor(autoencoder, config, public), config)
    reconstruction = codec.decode(codec.encode(public.images))
    return {"scaling_factor": codec.scaling_factor, "latent_shape": list(config.latent_shape()),
            "public_reconstruction_mse": round(float((reconstruction - public.images).pow(2).mean()), 6)}


KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (
    ModelKind("autoencoder", AutoencoderKL, public=True, per_compartment=False, wave=0, data="autoencoder", latent_space=False,
              build=lambda context, seed: build_autoencoder(context.config.autoencoder, seed),
              objective=lambda context, ids: (autoencoder_loss(context.config.autoencoder.kl_weight), None),
              describe=_autoencoder_summary),
    ModelKind("public-denoiser", UNet2DModel, public=True, per_compartment=False, wave=1, data="public", latent_space=True,
              build=_unet, objective=_denoising),
    ModelKind("denoiser", UNet2DModel, public=False, per_compartment=True, wave=2, data="compartment", latent_space=True,
              build=_unet, objective=_denoising),
    ModelKind("guard", NoisyClassifier, public=False, per_compartment=True, wave=2, data="compartment", latent_space=True,
              build=lambda context, seed: build_guard(context.shape[0], seed, context.config.guard_settings),
              objective=_guard_objective, describe=_guard_summary),
    ModelKind("router", NoisyClassifier, public=False, per_compartment=False, wave=3, data="compartment", latent_space=True,
              build=lambda context, seed: build_classifier(context.shape[0], len(context.compartments), seed),
              objective=_router_objective, structure=lambda context: {"num_outputs": len(context.compartments)}),
)}
PUBLIC_KINDS = tuple(name for name, kind in KINDS.items() if kind.public)
