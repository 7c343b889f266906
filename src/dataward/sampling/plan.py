"""Sampling from a ward: a request (how many, which class, which compartments, which weights) checked and turned into one
composed denoiser, run through the one sampling loop, with each sample's attribution to the compartments."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dataward.config import WeightsName
from dataward.diffusion.batched import StackedDenoisers
from dataward.diffusion.compose import ComposedDenoiser
from dataward.diffusion.latent import LatentDenoiser, make_latent_scheduler
from dataward.diffusion.sampling import Denoiser, make_sampler, sample_loop, unet_eps
from dataward.errors import DatawardError
from dataward.models.guard import GuardActivity
from dataward.progress import progress_task
from dataward.sampling.served import ServedModels


@dataclass
class SampleResult:
    """Samples and where they came from."""

    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: torch.Tensor | None  # (N,) or None for an unconditional ward
    attribution: torch.Tensor  # (N, K) trajectory-averaged weight per compartment (0 for compartments not used)
    final_weights: torch.Tensor  # (N, K) weights at the last step
    compartments: list[int]  # the compartments that were composed
    models: dict[int, dict]  # compartment -> {"model": id, "stage": r, "fallback": bool}
    weights: str  # router | density | soup | single (soup: attribution is the data share of the sample's class)
    sampler: str
    seconds: float
    guard_guided: float | None = None  # with guards: share of guard checks (sample x step x compartment, t < max_timestep) that guided

    def caption(self, seed: int | None = None) -> str:
        """One line that says what a picture of these samples shows (for sample grids)."""
        parts = [f"{self.images.shape[0]} samples from compartment{'s' if len(self.compartments) != 1 else ''} "
                 f"{', '.join(map(str, self.compartments))} ({self.weights} weights, {self.sampler} sampler)"]
        if self.guard_guided is not None:
            parts.append(f"guards steered {100 * self.guard_guided:.1f}% of their checks")
        if seed is not None:
            parts.append(f"seed {seed}")
        if self.labels is not None:
            parts.append("one row per class asked for")
        if len(self.compartments) > 1:
            parts.append("under each image, the share each compartment made of it")
        return "; ".join(parts)


@dataclass(frozen=True)
class SampleRequest:
    """What to sample (see :meth:`dataward.ward.Ward.sample`)."""

    n: int
    label: int | tuple[int, ...] | None = None  # one class for every sample, or one per sample
    seed: int = 0
    sampler: str | None = None
    steps: int = 50
    allowed: list[int] | None = None
    weights: WeightsName | None = None
    top_k: int | None = None
    guard: bool = False
    guard_scale: float | None = None
    guard_alpha: float | None = None
    batched: bool = False  # a mixture's compartments in one vectorized call (torch.func.vmap; equal to one call each within
    # float tolerance); off by default: on CPU it measured 3.8x slower than the loop at top-1 (BENCHMARKS.md, "Compartments from a base")


def _check(models: ServedModels, request: SampleRequest) -> tuple[WeightsName, list[int]]:
    """The request's weights and the compartments it may use (checked against the ward); errors name the bad field."""
    if request.n < 1:
        raise DatawardError(f"n must be at least 1, got {request.n}")
    if request.steps < 1 or request.steps > models.config.num_train_timesteps:
        raise DatawardError(f"steps must be between 1 and {models.config.num_train_timesteps}, got {request.steps}")
    if request.weights is not None and request.weights not in ("router", "density", "soup"):
        raise DatawardError(f"weights must be router, density or soup, got {request.weights!r}")
    if request.top_k is not None and request.top_k < 1:
        raise DatawardError(f"top-k must be at least 1, got {request.top_k}")
    known = models.compartments()
    allowed = sorted(set(known if request.allowed is None else request.allowed))
    unknown = [c for c in allowed if c not in known]
    if unknown:
        raise DatawardError(f"unknown compartment(s) {unknown}: this ward has {known}")
    weights = sampling_weights(request.weights, models.config.weights, allowed, known)
    if weights == "soup" and request.guard:
        raise DatawardError("guards steer each compartment's own model: sample with --weights density or router to use --guard")
    return weights, allowed


def sampling_weights(asked: WeightsName | None, default: WeightsName, allowed: list[int], known: list[int]) -> WeightsName:
    """The weights a request over ``allowed`` of the ward's ``known`` compartments samples with. The router was trained on
    every compartment's data, so it serves only requests that may use every compartment: asked for with fewer, it is
    refused; as the ward's default, such a request gets density weights instead. The CLI, the Python API, the pipeline
    and the service all apply this rule."""
    if asked is None:
        return "density" if default == "router" and not set(allowed) >= set(known) else default
    if asked == "router" and not set(allowed) >= set(known):
        raise DatawardError(f"router weights need every compartment ({known}): the router was trained on all of them, so sampling "
                            f"compartments {allowed} with it would use the others' data; use density or soup weights")
    return asked


def _labels(models: ServedModels, request: SampleRequest, use: list[int], counts: dict, generator: torch.Generator) -> torch.Tensor | None:
    """The class of each sample: the requested one, or drawn from the classes the used compartments hold."""
    num_classes, label = models.config.num_classes, request.label
    if num_classes is None:
        if label is not None:
            raise DatawardError("this ward is unconditional: --label is not available")
        return None
    if label is not None:
        labels = torch.tensor(label if isinstance(label, tuple) else [label] * request.n, dtype=torch.long)
        if labels.numel() != request.n:
            raise DatawardError(f"{labels.numel()} class labels for {request.n} samples: give one label, or one per sample")
        if not bool(((labels >= 0) & (labels < num_classes)).all()):
            raise DatawardError(f"label must be between 0 and {num_classes - 1}, got {label}")
        return labels
    present = sorted({l for c in use for l in counts[c]["labels"]})
    return torch.tensor(present)[torch.randint(0, len(present), (request.n,), generator=generator)]


def log_prior(use: list[int], y: torch.Tensor | None, counts: dict, n: int, num_classes: int | None) -> torch.Tensor:
    """log λ_i per sample (N, K): the compartment's share of the data (of the sample's class when conditional)."""
    if y is None:
        sizes = torch.tensor([float(counts[c]["samples"]) for c in use])
        return sizes.log().expand(n, -1).clone()
    table = torch.tensor([[float(counts[c]["labels"].get(l, 0)) for c in use] for l in range(num_classes)])
    return table[y].clamp_min(1e-12).log()


def _composed(models: ServedModels, denoisers: list[Denoiser], use: list[int], weights: WeightsName, top_k: int | None,
              prior: torch.Tensor, batched: StackedDenoisers | None) -> ComposedDenoiser:
    """The mixture ε = Σ_i w_i ε_i over the used compartments, with router or density weights."""
    router, columns = None, None
    if weights == "router":
        routers = models.served("router")
        if None not in routers:
            raise DatawardError("this ward has no trained router: sample with --weights density, or create the ward with the router on")
        router_model = models.model(routers[None])
        router = lambda x_t, t: router_model(x_t, t)
        known = models.compartments()
        columns = [known.index(c) for c in use]
    return ComposedDenoiser(denoisers, prior, models.scheduler.alphas_cumprod, weights, router, columns, top_k, batched)


@dataclass
class SamplingPlan:
    """What one sampling run needs (made by :func:`plan_sampling`): the denoiser, the starting noise and labels, the
    generator that continues drawing in the loop, and the sampling scheduler; :func:`finish_sampling` turns x_0 into a
    :class:`SampleResult`. Loops: :func:`generate` (the one sampling loop) and :class:`dataward.sampling.pipeline.WardPipeline`."""

    request: SampleRequest
    eps: Denoiser
    x_T: torch.Tensor
    y: torch.Tensor | None
    generator: torch.Generator
    scheduler: DDPMScheduler | DDIMScheduler
    sampler: str
    mode: str  # single | soup | router | density
    use: list[int]
    served: dict
    prior: torch.Tensor
    composed: ComposedDenoiser | None
    activity: GuardActivity | None
    started: float


def plan_sampling(models: ServedModels, request: SampleRequest, generator: torch.Generator | None = None) -> SamplingPlan:
    """Check ``request`` against the ward and build its denoiser, noise and labels (on the models served now), drawing
    from ``generator`` (default: a CPU generator seeded with ``request.seed``; the two are the same draws)."""
    started = time.time()
    weights, allowed = _check(models, request)
    served = models.served()
    use = [c for c in allowed if c in served]
    if not use:
        raise DatawardError(f"no trained model for compartments {allowed}: run `dataward train {models.path}`")
    counts = models.ledger.counts()
    generator = torch.Generator().manual_seed(request.seed) if generator is None else generator
    y = _labels(models, request, use, counts, generator)
    x_T = torch.randn((request.n, *models.model_shape()), generator=generator)  # images, or latents in a latent ward
    activity = GuardActivity() if request.guard else None
    prior = log_prior(use, y, counts, request.n, models.config.num_classes)
    composed = None
    if len(use) == 1:
        eps, mode = models.denoiser(use[0], request.guard, request.guard_scale, request.guard_alpha, activity), "single"
    elif weights == "soup":  # one model: the data-share-weighted average of the compartments' weights
        eps, mode = unet_eps(models.soup([served[c] for c in use], [float(counts[c]["samples"]) for c in use])), "soup"
    else:
        denoisers = [models.denoiser(c, request.guard, request.guard_scale, request.guard_alpha, activity) for c in use]
        batched = models.stacked([served[c] for c in use]) if request.batched and not request.guard else None  # guards steer each ε_i
        composed = _composed(models, denoisers, use, weights, request.top_k, prior, batched)
        eps, mode = composed, weights
    sampler = request.sampler or ("ddpm" if mode == "density" else "ddim")
    if mode == "density" and sampler != "ddpm":
        raise DatawardError("density weights need the stochastic sampler: use --sampler ddpm (or --weights router)")
    if models.config.latent:  # the same loop over latents (no x_0 clipping), then the public autoencoder decodes
        eps = LatentDenoiser(eps, models.codec())
        scheduler = make_latent_scheduler(models.scheduler, sampler)
    else:
        scheduler = make_sampler(models.scheduler, sampler)
    return SamplingPlan(request, eps, x_T, y, generator, scheduler, sampler, mode, use, served, prior, composed, activity, started)


def finish_sampling(models: ServedModels, plan: SamplingPlan, x0: torch.Tensor) -> SampleResult:
    """The images in [0, 1] (decoded in a latent ward), each sample's attribution, and the models used."""
    if models.config.latent:
        x0 = plan.eps.decode(x0)
    n, use, mode = plan.request.n, plan.use, plan.mode
    known = models.compartments()
    attribution, final = torch.zeros(n, len(known)), torch.zeros(n, len(known))
    cols = [known.index(c) for c in use]
    if mode == "soup":  # a soup sample's attribution is the data share of its class in each compartment (no density pass)
        attribution[:, cols] = final[:, cols] = torch.softmax(plan.prior, dim=1)
    elif plan.composed is None:
        attribution[:, cols[0]] = final[:, cols[0]] = 1.0
    else:
        attribution[:, cols] = plan.composed.attribution()
        final[:, cols] = plan.composed.final_weights
    served = plan.served
    if not (x0.isfinite().all() and attribution.isfinite().all() and final.isfinite().all()):
        raise DatawardError(f"the models of compartment(s) {use} produced non-finite values (NaN or infinity): nothing is "
                            f"returned; check their files and training (`dataward verify`)")
    stages = {c: {"model": served[c].id, "stage": served[c].stage, "fallback": models.is_fallback(served[c])} for c in use}
    return SampleResult(((x0.clamp(-1, 1) + 1) / 2), plan.y, attribution, final, use, stages, mode, plan.sampler,
                        time.time() - plan.started, None if plan.activity is None else plan.activity.share)


def generate(models: ServedModels, request: SampleRequest, progress=None) -> SampleResult:
    """Generate ``request.n`` images composed over the allowed compartments (all by default)."""
    plan = plan_sampling(models, request)
    update = progress_task(progress, f"sample {request.n}", request.steps)
    x0 = sample_loop(plan.eps, plan.x_T, plan.scheduler, steps=request.steps, y=plan.y, generator=plan.generator,
                     progress=lambda i: update(1))
    return finish_sampling(models, plan, x0)
