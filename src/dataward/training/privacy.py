"""What DP-SGD means for one model (DP-LDM, Lyu et al. arXiv 2305.15759; DPDM, Dockhorn et al.): the trainable set,
the validated plan, the accounting, and a ward's DP rules (its default trainable set, one DP setting per ward). The
config is :class:`dataward.config.DPConfig`; the training itself wraps the one loop: :mod:`dataward.training.dp`.

The accounting is an object you can save: :class:`PrivacyRecord` holds the accountant's state (opacus
``IAccountant.state_dict()``: the history of ``(sigma, q, steps)``), ``delta``, ``C``, and the trainable set, goes to JSON
for the model's metadata, and recomputes ε with either accountant. Disjoint compartments compose in parallel:
:func:`ward_epsilon` is the maximum over compartments.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Callable, Mapping, Sequence

import torch

from dataward.config import ACCOUNTANT_CHOICES, GRAD_SAMPLE_CHOICES, TRAINABLE_CHOICES, AccountantName, DPConfig, Trainable, WardConfig
from dataward.errors import DatawardError
from dataward.models.adapters import is_adapter_name

DELTA_DEFAULT_FACTOR = 10  # default delta = 1 / (DELTA_DEFAULT_FACTOR * N)
CLIP_CALIBRATION_EXAMPLES = 128  # public examples whose median gradient norm is the default clipping norm
CLIP_WITHOUT_PUBLIC_DATA = 1.0  # the default clipping norm when there is no public data to calibrate on


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
    if trainable == "lora":
        return is_adapter_name
    raise DatawardError(f"trainable must be one of {', '.join(TRAINABLE_CHOICES)}, got {trainable!r}")


def trainable_counts(model: torch.nn.Module, trainable: Trainable) -> tuple[int, int]:
    """(parameters selected by ``trainable``, all parameters) of ``model``."""
    keep = trainable_filter(trainable)
    selected = sum(p.numel() for n, p in model.named_parameters() if keep(n))
    return selected, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# A ward's DP rules (Ward.enable_dp applies them; the CLI's train --dp calls it)


def default_trainable(config: WardConfig) -> Trainable:
    """The trainable set of a ward's DP fine-tuning unless one is named: the compartments' adapters in a ward with LoRA
    adapters (the only choice there), else the DP-LDM recipe (attention)."""
    return "lora" if config.lora_rank() is not None else "attention"


def check_dp_change(config: WardConfig, dp: DPConfig, compartments: list[int] | None, replace_dp: bool) -> None:
    """A ward has one DP setting: a different one replaces it for every DP compartment, so it needs ``replace_dp``
    (``--replace-dp``). A bad trainable set is named first."""
    trainable_filter(dp.trainable)
    before, before_chosen = config.dp, config.dp_compartments
    after_chosen = None if compartments is None else tuple(sorted(set(compartments)))
    if before is None or replace_dp or (before == dp and before_chosen == after_chosen):
        return
    was = "every compartment" if before_chosen is None else f"compartment(s) {list(before_chosen)}"
    now = "every compartment" if after_chosen is None else f"compartment(s) {list(after_chosen)}"
    raise DatawardError(f"this ward already DP-trains {was} at ε = {before.epsilon:g}; the ward has one DP setting, so this one "
                        f"(ε = {dp.epsilon:g} for {now}) would replace it: {was} would retrain under the new setting (or "
                        "without DP if no longer named). Pass --replace-dp to do that")


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
