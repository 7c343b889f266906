"""Membership inference against a denoiser: the loss attack, PIA, the forgetting attack and their ROC statistics.

Images are (N, C, H, W) in [-1, 1] (or the latents a latent ward's denoisers see); the denoiser is ``eps(x_t, t, y)``
with the ``DDPMScheduler`` it was trained with. Every function that draws noise takes a ``seed`` (a fresh
``torch.Generator`` per (seed, t)), never global RNG state.

- :func:`loss_attack` (Matsumoto et al. 2023) and :func:`pia` (Kong et al. 2024): AUC and TPR at 1% FPR of members vs
  non-members over a timestep sweep; :func:`forgetting_attack` runs the loss attack on forgotten vs held-out samples.
- :func:`roc` and :func:`pooled_rank_auc`: the ROC of one model, and the AUC pooled over several models with its null.
- :func:`mismatched_sources`: whether members and non-members come from different sources (then an attack is not valid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from dataward.diffusion.sampling import Denoiser
from dataward.errors import DatawardError

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

DEFAULT_TIMESTEPS: tuple[int, ...] = (10, 25, 50, 100, 150, 200, 300, 400, 500)  # sweep for the MIA attacks (T = 1000)
FORGETTING_T = 100  # the forgetting attack's timestep when no membership attack chose one for the compartment


@dataclass
class AttackResult:
    """A membership inference attack: higher ``scores`` mean "member". ROC over members (positives) vs non-members."""

    attack: str  # "loss" (Matsumoto et al. 2023) or "pia" (Kong et al. 2024)
    auc: float  # ROC AUC at the best timestep
    tpr_at_1pct_fpr: float  # true-positive rate at 1% false-positive rate, best timestep
    best_t: int  # the timestep with the highest AUC (the attacker's best case: chosen on the same data)
    auc_by_t: dict[int, float]  # AUC per swept timestep
    fpr: np.ndarray  # ROC curve at best_t
    tpr: np.ndarray
    member_scores: np.ndarray  # (N_members,) at best_t
    nonmember_scores: np.ndarray  # (N_nonmembers,) at best_t

    def summary(self, max_points: int = 200) -> dict:
        """JSON-ready: AUC, TPR@1%FPR, best t, AUC per t and the ROC curve (at most ``max_points`` points)."""
        keep = np.unique(np.linspace(0, len(self.fpr) - 1, min(len(self.fpr), max_points)).round().astype(int))
        return {
            "attack": self.attack,
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "best_t": self.best_t,
            "auc_by_t": {str(t): a for t, a in self.auc_by_t.items()},
            "n_members": int(len(self.member_scores)),
            "n_nonmembers": int(len(self.nonmember_scores)),
            "roc": {"fpr": self.fpr[keep].tolist(), "tpr": self.tpr[keep].tolist()},
        }


def roc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(AUC, TPR at 1% FPR, fpr, tpr) with members as positives; higher score = more likely member."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    s = np.concatenate([member_scores, nonmember_scores]).astype(np.float64)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    auc = float(roc_auc_score(y, s))
    tpr_low = float(tpr[fpr <= 0.01].max()) if (fpr <= 0.01).any() else 0.0
    return auc, tpr_low, fpr, tpr


def _check_sets(members: torch.Tensor, nonmembers: torch.Tensor) -> None:
    if members.ndim != 4 or nonmembers.ndim != 4 or members.shape[1:] != nonmembers.shape[1:]:
        raise DatawardError(f"members {tuple(members.shape)} and non-members {tuple(nonmembers.shape)} must be (N, C, H, W) of one image shape")
    if len(members) == 0 or len(nonmembers) == 0:
        raise DatawardError("membership inference needs at least one member and one non-member")


def _batched(fn: Callable[[slice], torch.Tensor], n: int, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(slice(i, min(i + batch_size, n))) for i in range(0, n, batch_size)])


@torch.no_grad()
def loss_scores(
    eps: Denoiser,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    t: int,
    *,
    y: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-sample denoising loss ||ε − ε_θ(x_t, t, y)||² (mean over pixels), x_t = ``scheduler.add_noise(x0, ε, t)``. (N,)"""
    noise = torch.randn_like(x0) if noise is None else noise
    t_tensor = torch.tensor(int(t), dtype=torch.long)

    def run(s: slice) -> torch.Tensor:
        x_t = scheduler.add_noise(x0[s], noise[s], t_tensor)
        pred = eps(x_t, t_tensor, None if y is None else y[s])
        return (pred - noise[s]).pow(2).flatten(1).mean(dim=1)

    return _batched(run, len(x0), batch_size)


def _sweep(
    name: str,
    score_at: Callable[[torch.Tensor, torch.Tensor | None, int, torch.Generator], torch.Tensor],
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    member_labels: torch.Tensor | None,
    nonmember_labels: torch.Tensor | None,
    timesteps: Sequence[int],
    seed: int,
) -> AttackResult:
    _check_sets(members, nonmembers)
    if not timesteps:
        raise DatawardError("the timestep sweep is empty")
    results = {}
    for t in timesteps:
        # one generator per (seed, t), members first: the same noise stream whatever the other timesteps are
        generator = torch.Generator().manual_seed(seed * 100_003 + int(t))
        m = -score_at(members, member_labels, int(t), generator).double().numpy()  # low loss -> member
        n = -score_at(nonmembers, nonmember_labels, int(t), generator).double().numpy()
        results[int(t)] = (roc(m, n), m, n)
    best_t = max(results, key=lambda t: (results[t][0][0], -t))
    (auc, tpr_low, fpr, tpr), m, n = results[best_t]
    return AttackResult(name, auc, tpr_low, best_t, {t: r[0][0] for t, r in results.items()}, fpr, tpr, m, n)


def loss_attack(
    eps: Denoiser,
    scheduler: DDPMScheduler,
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    *,
    member_labels: torch.Tensor | None = None,
    nonmember_labels: torch.Tensor | None = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    repeats: int = 1,
    seed: int = 0,
    batch_size: int = 256,
) -> AttackResult:
    """Loss attack (Matsumoto et al. 2023, *Membership Inference Attacks against Diffusion Models*).

    Score of x_0 at timestep t: −||ε − ε_θ(x_t, t, y)||² averaged over ``repeats`` noise draws, with
    x_t = ``scheduler.add_noise(x_0, ε, t)`` and ε from a generator seeded by (``seed``, t). The sweep over
    ``timesteps`` reports the t with the highest AUC (the attacker's best case, as in the paper), so on data the model
    never saw the AUC is ~0.5 with a small upward bias from the choice of t.
    """

    def score_at(x0, y, t, generator):
        total = torch.zeros(len(x0), dtype=torch.float64)
        for _ in range(repeats):
            noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
            total += loss_scores(eps, scheduler, x0, t, y=y, noise=noise, batch_size=batch_size).double()
        return total / repeats

    return _sweep("loss", score_at, members, nonmembers, member_labels, nonmember_labels, timesteps, seed)


def pia(
    eps: Denoiser,
    scheduler: DDPMScheduler,
    members: torch.Tensor,
    nonmembers: torch.Tensor,
    *,
    member_labels: torch.Tensor | None = None,
    nonmember_labels: torch.Tensor | None = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    p: float = 4.0,
    seed: int = 0,
    batch_size: int = 256,
) -> AttackResult:
    """PIA, proximal initialization attack (Kong et al. 2024, *An Efficient Membership Inference Attack for the
    Diffusion Model by Proximal Initialization*).

    ε_0 = ε_θ(x_0, 0, y) is taken as the noise, x_t = ``scheduler.add_noise(x_0, ε_0, t)`` (the deterministic DDIM
    forward step), and the score is −||ε_0 − ε_θ(x_t, t, y)||_p (p = 4 as in the paper, mean-normalized per pixel).
    No randomness is drawn; ``seed`` is accepted for a uniform interface. Same timestep sweep as :func:`loss_attack`.
    """
    zero = torch.tensor(0, dtype=torch.long)
    eps_0_cache: dict[int, torch.Tensor] = {}  # ε_θ(x_0, 0) does not depend on t: computed once per set

    @torch.no_grad()
    def score_at(x0, y, t, generator):
        t_tensor = torch.tensor(int(t), dtype=torch.long)
        if id(x0) not in eps_0_cache:
            eps_0_cache[id(x0)] = _batched(lambda s: eps(x0[s], zero, None if y is None else y[s]), len(x0), batch_size)
        eps_0_all = eps_0_cache[id(x0)]

        def run(s: slice) -> torch.Tensor:
            eps_0 = eps_0_all[s]
            x_t = scheduler.add_noise(x0[s], eps_0, t_tensor)
            return (eps_0 - eps(x_t, t_tensor, None if y is None else y[s])).abs().pow(p).flatten(1).mean(dim=1).pow(1.0 / p)

        return _batched(run, len(x0), batch_size)

    return _sweep("pia", score_at, members, nonmembers, member_labels, nonmember_labels, timesteps, seed)


def forgetting_attack(
    eps: Denoiser,
    scheduler: DDPMScheduler,
    forgotten: torch.Tensor,
    heldout: torch.Tensor,
    *,
    forgotten_labels: torch.Tensor | None = None,
    heldout_labels: torch.Tensor | None = None,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = 0,
) -> AttackResult:
    """Loss-attack AUC of forgotten samples (as "members") vs held-out samples: ~0.5 if forgetting worked."""
    result = loss_attack(
        eps, scheduler, forgotten, heldout, member_labels=forgotten_labels, nonmember_labels=heldout_labels, timesteps=timesteps, seed=seed
    )
    result.attack = "forgetting-loss"
    return result


def pooled_rank_auc(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict:
    """AUC of "members" vs non-members pooled over several models (e.g. forgotten samples of several compartments).

    ``pairs`` holds, per model, (member scores, non-member scores) under that model. Each member's score is ranked
    among its own model's non-member scores (ties count half) and the AUC is the mean of those percentiles; for one
    model it equals the ROC AUC. If members are distributed like non-members and the model never saw them, each
    percentile is ~uniform, so the AUC is 0.5 with standard deviation ``null_sd`` = 1/sqrt(12 n): ``z`` measures the
    distance from that null in those units (|z| <= 1.96: consistent with never seen, at the 5% level).
    """
    percentiles = [
        (float((nonmembers < score).sum()) + 0.5 * float((nonmembers == score).sum())) / len(nonmembers)
        for members, nonmembers in pairs for score in np.asarray(members)
    ]
    if not percentiles:
        raise DatawardError("no member scores to pool")
    auc = float(np.mean(percentiles))
    null_sd = 1.0 / math.sqrt(12 * len(percentiles))
    return {"auc": auc, "n": len(percentiles), "null_sd": null_sd, "z": (auc - 0.5) / null_sd}


def mismatched_sources(member_ids: tuple[str, ...], nonmember_ids: tuple[str, ...]) -> dict[str, str]:
    """``{"invalid": why}`` when members and non-members come from different named sources (IDs ``source:...``, e.g.
    printed digits against held-out handwritten ones): the attack then tells the two sources apart, which is not
    memorisation; else nothing."""
    def sources(ids):
        return {i.split(":", 1)[0] for i in ids if ":" in i}

    members, nonmembers = sources(member_ids), sources(nonmember_ids)
    if not members or not nonmembers or members & nonmembers:
        return {}
    return {"invalid": f"members come from {', '.join(sorted(members))} and the held-out non-members from "
                       f"{', '.join(sorted(nonmembers))}: the AUC measures how the two sources differ, not memorisation"}
