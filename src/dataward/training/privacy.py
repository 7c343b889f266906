"""Private fine-tuning (DP-LDM, Lyu et al. arXiv 2305.15759; DPDM, Dockhorn et al.): DP-SGD around the one trainer.

Privacy is a wrapper, not a fork. The model, optimizer and EMA live in the same :class:`~dataward.training.loop.TrainState`
as every other model; :func:`make_private` wraps the model (per-sample gradients), the optimizer (clip to ``C``, add
Gaussian noise ``sigma * C``) and a data loader (Poisson sampling at rate ``q``) with opacus ``PrivacyEngine.make_private``,
and :func:`run_private_epochs` steps them with the unreduced per-sample loss the non-private trainer uses
(:func:`dataward.training.loop.denoiser_loss`). Checkpoints are ``TrainState.save`` as usual. With ``noise_multiplicity`` K > 1
(DPDM's noise multiplicity) each example's loss averages K draws of (t, noise) before its gradient is clipped: the same ε
for K times the compute, and a clipped gradient that carries more signal (:func:`backward_per_example`).

The accounting is an object you can save: :class:`PrivacyRecord` holds the accountant's state (opacus
``IAccountant.state_dict()``: the history of ``(sigma, q, steps)``), ``delta``, ``C``, and the trainable set, goes to JSON
for the model's metadata, and recomputes ε with either accountant. Disjoint compartments compose in parallel:
:func:`ward_epsilon` is the maximum over compartments.

Per-sample gradients: opacus's default ``hooks`` grad sampler for ``Conv2d`` unfolds its input with ``as_strided``
assuming an NCHW-contiguous tensor; in a diffusers UNet the activations that leave an attention block are not, and the
per-sample gradients of the following convolutions come out wrong (all zero). In ``hooks`` mode we make every trainable
convolution's input contiguous first (a forward pre-hook, removed by :meth:`PrivateTraining.close`); ``functorch`` mode
(vmap per layer) is right as is. ``tests/test_privacy.py`` checks both against single-sample backward passes.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Callable, Literal, Mapping, Sequence

import torch
from diffusers import DDPMScheduler
from torch.utils.data import DataLoader, TensorDataset

from dataward.data import Dataset
from dataward.errors import DatawardError
from dataward.models.nets import build_unet, derive_seed
from dataward.training.loop import PerSampleLoss, TrainConfig, TrainState, denoiser_loss, run_steps

Trainable = Literal["attention", "embedding", "full"]
AccountantName = Literal["prv", "rdp"]
GradSampleMode = Literal["hooks", "functorch"]

TRAINABLE_CHOICES = ("attention", "embedding", "full")
ACCOUNTANT_CHOICES = ("prv", "rdp")
GRAD_SAMPLE_CHOICES = ("hooks", "functorch")
# Adam learning rates of DP-SGD by trainable set, from the sweep in BENCHMARKS.md ("Private fine-tuning"): the few
# attention parameters want large steps (at 2e-3 the noise drowns them: CAS 0.65 vs 0.80 at 1e-2), while 1e-2 on the
# whole model is ruinous (0.46 vs 0.76 at 2e-3); the class embedding alone (1,280 numbers) wants 1e-1 (ε = 1: CAS 0.76;
# 0.64 at 1e-2, 0.72 at 4e-1).
DP_LEARNING_RATES = {"attention": 1e-2, "embedding": 1e-1, "full": 2e-3}
DELTA_DEFAULT_FACTOR = 10  # default delta = 1 / (DELTA_DEFAULT_FACTOR * N)
CLIP_CALIBRATION_EXAMPLES = 128  # public examples whose median gradient norm is the default clipping norm
CLIP_WITHOUT_PUBLIC_DATA = 1.0  # the default clipping norm when there is no public data to calibrate on


@dataclass(frozen=True)
class DPConfig:
    """How a model is trained with DP-SGD. Saved as JSON in the model's metadata (with the :class:`PrivacyRecord`).

    The EMA decay and thread count come from :class:`~dataward.training.loop.TrainConfig`; its ``lr``, ``epochs``,
    ``steps`` and ``batch_size`` are NOT used here: ``lr`` below is DP-SGD's, and ``epochs`` and ``batch`` define the
    sampling the accountant sees.
    """

    epsilon: float = 10.0  # target ε for the whole run; sigma is calibrated so the accountant's ε <= this
    delta: float | None = None  # target δ; None -> 1 / (10 N) for N private examples; must be < 1 / N
    clip: float | None = None  # C: per-sample gradients are clipped to L2 norm <= C (flat, over the trainable parameters);
    # None: the median per-example gradient norm of the starting model on public data (calibrate_clip), 1.0 without any
    batch: int = 256  # expected logical batch under Poisson sampling; q = 1 / ceil(N / batch) (opacus's convention)
    epochs: int = 50  # passes; one pass = ceil(N / batch) logical steps, so steps = epochs * ceil(N / batch)
    trainable: Trainable = "attention"  # attention: the DP-LDM recipe (attention modules + class embedding); embedding: the
    # class embedding only (the least noise: best on small private sets and at small ε); full: all
    lr: float | None = None  # Adam learning rate; None: DP_LEARNING_RATES[trainable] (attention 1e-2, embedding 1e-1, full 2e-3)
    accountant: AccountantName = "prv"  # prv (Gopi et al. 2021, tight) or rdp (Mironov 2017, looser upper bound)
    max_physical_batch: int = 128  # logical batches are split into physical ones of at most this size (BatchMemoryManager)
    secure_rng: bool = False  # cryptographically secure sampling and noise (needs torchcsprng); not bitwise reproducible
    grad_sample_mode: GradSampleMode = "hooks"  # per-sample gradients: opacus hooks (+ contiguity fix) or functorch
    noise_multiplicity: int = 1  # K: each example's loss averages K draws of (t, noise) before clipping (DPDM): same ε, K x compute

    def learning_rate(self) -> float:
        """DP-SGD's Adam learning rate: ``lr``, or the default for the trainable set."""
        return self.lr if self.lr is not None else DP_LEARNING_RATES[self.trainable]


@dataclass(frozen=True)
class DPPlan:
    """What the validated config means for N examples: the numbers the accountant and the loop use."""

    n_examples: int  # N: private examples
    delta: float  # δ actually used
    sample_rate: float  # q: Poisson sampling probability per example per step
    steps_per_epoch: int  # logical steps in one pass
    steps: int  # total logical (optimizer) steps
    sigma: float  # noise multiplier: noise std = sigma * C on the summed clipped gradients
    trainable_params: int  # parameters DP-SGD updates
    total_params: int  # all parameters of the model

    @property
    def trainable_fraction(self) -> float:
        """Share of the model's parameters that DP-SGD updates."""
        return self.trainable_params / self.total_params


# ---------------------------------------------------------------------------------------------------------------------
# The trainable set


def trainable_attention(name: str) -> bool:
    """The DP-LDM recipe: True for parameters of attention modules (diffusers names hold ``attentions``) and of the
    class embedding; everything else stays at its public-pretrained value."""
    parts = name.split(".")
    return "attentions" in parts or "class_embedding" in parts


def trainable_embedding(name: str) -> bool:
    """True for the class embedding's parameters only: the model keeps everything it learned from public data and DP-SGD
    moves where each class sits in its conditioning space."""
    return "class_embedding" in name.split(".")


def trainable_filter(trainable: Trainable) -> Callable[[str], bool]:
    """The ``trainable(name)`` predicate for ``TrainState.fresh`` for a :class:`DPConfig` ``trainable`` choice."""
    if trainable == "attention":
        return trainable_attention
    if trainable == "embedding":
        return trainable_embedding
    if trainable == "full":
        return lambda name: True
    raise DatawardError(f"trainable must be one of {', '.join(TRAINABLE_CHOICES)}, got {trainable!r}")


def trainable_counts(model: torch.nn.Module, trainable: Trainable) -> tuple[int, int]:
    """(parameters selected by ``trainable``, all parameters) of ``model``."""
    keep = trainable_filter(trainable)
    selected = sum(p.numel() for n, p in model.named_parameters() if keep(n))
    return selected, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Accounting


def _accountant(name: str):
    from opacus.accountants import create_accountant

    if name not in ACCOUNTANT_CHOICES:
        raise DatawardError(f"accountant must be one of {', '.join(ACCOUNTANT_CHOICES)}, got {name!r}")
    return create_accountant(mechanism=name)


def other_accountant(name: AccountantName) -> AccountantName:
    """The accountant that cross-checks ``name``'s ε (PRV <-> RDP)."""
    return "rdp" if name == "prv" else "prv"


def epsilon_for(sigma: float, sample_rate: float, steps: int, delta: float, accountant: AccountantName = "prv") -> float:
    """ε after ``steps`` Poisson-subsampled Gaussian steps with noise multiplier ``sigma`` and rate ``sample_rate``."""
    return history_epsilon(((float(sigma), float(sample_rate), int(steps)),), float(delta), accountant)


@functools.lru_cache(maxsize=256)
def history_epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: AccountantName = "prv") -> float:
    """ε at ``delta`` of an accountant history ``((sigma, q, steps), ...)`` (cached: the PRV accountant takes ~0.3 s)."""
    if not history:
        return 0.0
    acc = _accountant(accountant)
    acc.history = [(float(s), float(q), int(k)) for s, q, k in history]
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def calibrate_sigma(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: AccountantName = "prv") -> float:
    """The noise multiplier sigma that meets (ε, δ) after ``steps`` steps at rate ``sample_rate`` (opacus
    ``get_noise_multiplier``: a bisection that returns the upper end, so the accountant's ε never exceeds ``epsilon``).
    Cached: planning validates before training and again when the job runs."""
    from opacus.accountants.utils import get_noise_multiplier

    _accountant(accountant)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant)
            )
    except (ValueError, RuntimeError, OverflowError, ZeroDivisionError) as error:
        raise DatawardError(
            f"the privacy budget epsilon={epsilon:g}, delta={delta:.3g} cannot be met with {steps} steps at sampling rate "
            f"q={sample_rate:.4g} (the {accountant} accountant found no noise multiplier: {error}); "
            f"raise epsilon, or lower epochs or batch"
        ) from None


@dataclass(frozen=True)
class PrivacyRecord:
    """The saved accounting of one DP-trained model: accountant state plus the DP-SGD parameters (DESIGN Guarantee 5).

    ``history`` is opacus ``IAccountant.state_dict()["history"]``: ``(sigma, q, steps)`` per phase of training.
    """

    accountant: str  # the accountant that calibrated sigma and reports epsilon: prv or rdp
    history: tuple[tuple[float, float, int], ...]  # accountant state: (sigma, q, steps) per phase
    delta: float  # δ
    clip: float  # C
    target_epsilon: float  # the ε the noise was calibrated to
    n_examples: int  # N: private examples
    expected_batch: float  # N * q
    epochs: int  # passes planned
    trainable: str  # attention or full
    trainable_params: int  # parameters DP-SGD updated
    total_params: int  # all parameters of the model
    grad_sample_mode: str  # how per-sample gradients were computed
    secure_rng: bool  # whether sampling and noise used a cryptographically secure RNG
    noise_multiplicity: int = 1  # K draws of (t, noise) averaged per example before clipping
    extra: dict = field(default_factory=dict)  # anything else the caller records (e.g. public pretraining source)

    @property
    def steps(self) -> int:
        """Total DP-SGD steps accounted."""
        return sum(int(s) for _, _, s in self.history)

    @property
    def sigma(self) -> float:
        """The noise multiplier (of the last phase; training uses one phase)."""
        return float(self.history[-1][0]) if self.history else float("nan")

    @property
    def sample_rate(self) -> float:
        """q, the Poisson sampling rate (of the last phase)."""
        return float(self.history[-1][1]) if self.history else float("nan")

    @property
    def trainable_fraction(self) -> float:
        """Share of parameters updated with DP-SGD."""
        return self.trainable_params / self.total_params

    def accountant_state(self) -> dict:
        """The opacus accountant ``state_dict()`` (JSON-ready)."""
        return {"mechanism": self.accountant, "history": [list(h) for h in self.history]}

    def epsilon(self, accountant: AccountantName | None = None) -> float:
        """ε at ``delta`` from the history, with this record's accountant or another one (a cross-check)."""
        return history_epsilon(tuple((float(s), float(q), int(k)) for s, q, k in self.history), float(self.delta), accountant or self.accountant)

    def to_dict(self, check_accountant: AccountantName | None = None) -> dict:
        """JSON-ready metadata: every field, the accountant state, and ε (plus ε from ``check_accountant``)."""
        out = asdict(self)
        out["history"] = [list(h) for h in self.history]
        out["dp"] = True
        out["accountant_state"] = self.accountant_state()
        out["epsilon"] = self.epsilon()
        out["sigma"] = self.sigma
        out["sample_rate"] = self.sample_rate
        out["steps"] = self.steps
        out["trainable_fraction"] = self.trainable_fraction
        if check_accountant is not None:
            out["epsilon_check"] = {check_accountant: self.epsilon(check_accountant)}
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> "PrivacyRecord":
        """Rebuild a record from :meth:`to_dict` output (derived keys are ignored, ε is recomputed on demand)."""
        names = [f for f in cls.__dataclass_fields__]
        optional = {f.name for f in fields(cls) if f.default is not MISSING or f.default_factory is not MISSING}
        missing = [n for n in names if n not in data and n not in optional]
        if missing:
            raise DatawardError(f"privacy metadata is missing {', '.join(missing)}")
        values = {n: data[n] for n in names if n in data}
        values["history"] = tuple((float(s), float(q), int(k)) for s, q, k in data["history"])
        values["extra"] = dict(data.get("extra", {}))
        return cls(**values)


def ward_epsilon(records: Sequence[PrivacyRecord | Mapping | None]) -> float:
    """ε of a ward whose compartments are disjoint: parallel composition, so the maximum over compartments.

    Each entry is a compartment's :class:`PrivacyRecord` (or its :meth:`~PrivacyRecord.to_dict`); ``None`` marks a
    compartment trained without DP, which makes the ward's ε infinite. Models that see several compartments (a joint
    router) or that train on private data without DP (a guard) are outside this bound: the caller must add them.
    """
    if not records:
        raise DatawardError("ward_epsilon needs at least one compartment")
    eps = []
    for record in records:
        if record is None:
            return math.inf
        if not isinstance(record, PrivacyRecord):
            record = PrivacyRecord.from_dict(record)
        eps.append(record.epsilon())
    return max(eps)


def ward_delta(records: Sequence[PrivacyRecord | Mapping | None]) -> float:
    """δ of a ward of disjoint DP compartments: the maximum over compartments (1.0 if one is not DP)."""
    if not records:
        raise DatawardError("ward_delta needs at least one compartment")
    out = 0.0
    for record in records:
        if record is None:
            return 1.0
        out = max(out, float(record.delta if isinstance(record, PrivacyRecord) else record["delta"]))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Validation: every problem the user can fix is found before any training starts


def _check_model(model: torch.nn.Module) -> None:
    from opacus.validators import ModuleValidator

    errors = [e for e in ModuleValidator.validate(model, strict=False) if "training mode" not in str(e)]  # training sets it
    if errors:
        details = "; ".join(str(e) for e in errors[:5])
        raise DatawardError(f"the model has layers opacus cannot train with DP ({len(errors)} problem(s)): {details}")


def plan_dp(config: DPConfig, n_examples: int, model: torch.nn.Module) -> DPPlan:
    """Validate ``config`` for ``n_examples`` private examples and ``model``, and calibrate sigma.

    Raises :class:`DatawardError` naming the field and the numbers for: ε <= 0 or not finite, δ >= 1/N or <= 0,
    C <= 0, batch < 1, epochs < 1, a budget no noise multiplier meets, layers opacus cannot handle,
    an empty trainable set, secure RNG without torchcsprng.
    """
    n = int(n_examples)
    if n < 1:
        raise DatawardError(f"DP training needs at least one private example, got N={n}")
    if not (isinstance(config.epsilon, (int, float)) and math.isfinite(config.epsilon) and config.epsilon > 0):
        raise DatawardError(f"epsilon must be a positive finite number, got epsilon={config.epsilon!r} (train without --dp for no privacy)")
    delta = config.delta if config.delta is not None else 1.0 / (DELTA_DEFAULT_FACTOR * n)
    if not (math.isfinite(delta) and delta > 0):
        raise DatawardError(f"delta must be positive, got delta={delta!r}")
    if delta >= 1.0 / n:
        raise DatawardError(
            f"delta={delta:.3g} is >= 1/N = {1.0 / n:.3g} for N={n} private examples: such a delta allows releasing "
            f"whole examples; use delta < {1.0 / n:.3g} (default 1/(10 N) = {1.0 / (DELTA_DEFAULT_FACTOR * n):.3g})"
        )
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise DatawardError(f"lr must be a positive number, got lr={config.lr!r}")
    if config.clip is not None and not (math.isfinite(config.clip) and config.clip > 0):
        raise DatawardError(f"clip (the per-sample gradient norm C) must be positive, got clip={config.clip!r}")
    if not (isinstance(config.batch, int) and config.batch >= 1):
        raise DatawardError(f"batch must be a positive integer, got batch={config.batch!r} (N={n}; batch >= N means q=1)")
    if not (isinstance(config.epochs, int) and config.epochs >= 1):
        raise DatawardError(f"epochs must be a positive integer, got epochs={config.epochs!r}")
    if not (isinstance(config.noise_multiplicity, int) and config.noise_multiplicity >= 1):
        raise DatawardError(f"noise_multiplicity must be a positive integer, got {config.noise_multiplicity!r}")
    if not (isinstance(config.max_physical_batch, int) and config.max_physical_batch >= 1):
        raise DatawardError(f"max_physical_batch must be a positive integer, got {config.max_physical_batch!r}")
    if config.accountant not in ACCOUNTANT_CHOICES:
        raise DatawardError(f"accountant must be one of {', '.join(ACCOUNTANT_CHOICES)}, got {config.accountant!r}")
    if config.grad_sample_mode not in GRAD_SAMPLE_CHOICES:
        raise DatawardError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_CHOICES)}, got {config.grad_sample_mode!r}")
    if config.secure_rng:
        try:
            import torchcsprng  # noqa: F401
        except ImportError:
            raise DatawardError("secure_rng=True needs the torchcsprng package (opacus secure mode), which is not installed") from None
    selected, total = trainable_counts(model, config.trainable)
    if selected == 0:
        raise DatawardError(
            f"trainable={config.trainable!r} selects no parameters of this model "
            f"(attention needs parameters named '*.attentions.*' or 'class_embedding.*'; embedding needs a class-conditional "
            f"model, with 'class_embedding.*')"
        )
    _check_model(model)
    steps_per_epoch = math.ceil(n / config.batch)
    sample_rate = 1.0 / steps_per_epoch  # what opacus derives from a loader of len ceil(N / batch)
    steps = config.epochs * int(1 / sample_rate)  # DPDataLoader yields int(1 / q) logical batches per pass
    sigma = calibrate_sigma(config.epsilon, delta, sample_rate, steps, config.accountant)
    return DPPlan(n, delta, sample_rate, int(1 / sample_rate), steps, sigma, selected, total)


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


# ---------------------------------------------------------------------------------------------------------------------
# The wrapper


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(),) + tuple(args[1:])


@dataclass
class PrivateTraining:
    """A :class:`TrainState` wrapped for DP-SGD: per-sample-gradient model, clipping/noising optimizer, Poisson loader.

    ``state`` is the unwrapped state: its model, Adam and EMA are what :meth:`TrainState.save` writes.
    """

    state: TrainState
    module: torch.nn.Module  # opacus GradSampleModule around state.model
    optimizer: torch.optim.Optimizer  # opacus DPOptimizer around state.optimizer
    loader: DataLoader  # opacus DPDataLoader: Poisson sampling at plan.sample_rate
    engine: object  # opacus PrivacyEngine (holds the accountant)
    config: DPConfig
    plan: DPPlan
    handles: list = field(default_factory=list)  # forward pre-hooks of the contiguity fix

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
        """Remove opacus's hooks and ours from ``state.model`` (it is a plain module again)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.module._close()
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
    loss = per_sample_loss(private.module, rows, None if y is None else y.repeat_interleave(k, dim=0), None, generator).mean()
    if not torch.isfinite(loss):
        raise DatawardError(f"DP training diverged at step {private.state.step}: loss is {loss.item()}")
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
    """``config.epochs`` passes of DP-SGD: Poisson logical batches, split into physical batches of at most
    ``max_physical_batch`` (opacus BatchMemoryManager); the same per-sample loss, Adam and EMA as ``run_steps``.

    ``on_step`` gets the mean loss of the last physical batch: it is computed on private data and is NOT covered
    by ε, so show it locally and never publish it. Returns the :class:`PrivacyRecord`.
    """
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    state, optimizer = private.state, private.optimizer
    trainable = private.trainable_parameters()
    state.model.train()
    with BatchMemoryManager(data_loader=private.loader, max_physical_batch_size=private.config.max_physical_batch, optimizer=optimizer) as loader:
        for _ in range(private.config.epochs):
            for batch in loader:
                x0 = batch[0].to(device)  # (B, C, H, W), B varies (Poisson)
                y = batch[1].to(device) if len(batch) > 1 else None
                loss = torch.zeros(())
                if x0.shape[0] == 0:  # an empty Poisson batch still takes a (pure-noise) step
                    for p in trainable:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                else:
                    loss = backward_per_example(private, per_sample_loss, x0, y, generator)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if optimizer._is_last_step_skipped:  # a physical batch inside a logical one: no step yet
                    continue
                state.ema.step(state.model.parameters())
                state.step += 1
                if on_step is not None:
                    on_step(loss.item())
    return private.record()


# ---------------------------------------------------------------------------------------------------------------------
# The two entry points the ward calls


def pretrain_denoiser(
    public: Dataset,
    train: TrainConfig,
    *,
    seed: int,
    preset: str = "tiny",
    scheduler: DDPMScheduler,
    on_step: Callable[[float], None] | None = None,
) -> TrainState:
    """Train a class-conditional denoiser on PUBLIC data (pixels, or latents from
    :meth:`dataward.diffusion.latent.LatentCodec.encode_dataset`) with the ordinary trainer. Deterministic in ``seed``."""
    _, channels, size, width = public.images.shape
    if size != width:
        raise DatawardError(f"public images must be square, got {size}x{width}")
    model = build_unet(preset, size, channels, public.num_classes, derive_seed(seed, "public-denoiser", "init"))
    state = TrainState.fresh(model, train)
    generator = torch.Generator().manual_seed(derive_seed(seed, "public-denoiser", "train"))
    run_steps(state, public, denoiser_loss(scheduler), train.total_steps(len(public)), train, generator, on_step=on_step)
    return state


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
    **extra,
) -> tuple[TrainState, PrivacyRecord]:
    """DP-SGD fine-tuning of ``model`` (public-pretrained: DP-LDM; freshly built: DP from scratch, DPDM-style) on the
    ``private`` data. Validates everything before training. ``train`` gives EMA decay and threads; ``calibration`` is
    PUBLIC data (as the model sees it) that sets the clipping norm when ``config.clip`` is None (:func:`calibrate_clip`;
    without it C = 1); ``extra`` goes into the record (e.g. ``public="printed:count=3000"``). Returns the trained state
    and its :class:`PrivacyRecord`.
    """
    if private.num_classes is not None and getattr(model.config, "num_class_embeds", None) not in (None, private.num_classes):
        raise DatawardError(f"the model has {model.config.num_class_embeds} class embeddings but the private data has {private.num_classes} classes")
    plan = plan_dp(config, len(private), model)
    if config.clip is None:  # without calibration data make_private applies the default
        if calibration is not None:
            config = replace(config, clip=calibrate_clip(model, calibration, config.trainable, scheduler, seed=seed))
        extra["clip_calibrated_on"] = "public data (median per-example gradient norm)" if calibration is not None else f"nothing (default {CLIP_WITHOUT_PUBLIC_DATA})"
    extra["lr"] = config.learning_rate()
    state = TrainState.fresh(model, replace(train, lr=config.learning_rate()), trainable_filter(config.trainable))
    wrapped = make_private(state, private, config, seed=seed, plan=plan)
    try:
        generator = torch.Generator().manual_seed(derive_seed(seed, "dp-loss"))
        run_private_epochs(wrapped, denoiser_loss(scheduler), generator, device=device, on_step=on_step)
        record = wrapped.record(**extra)
    finally:
        wrapped.close()
    return state, record
