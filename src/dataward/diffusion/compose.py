"""Composition over compartments: ε(x_t, t) = Σ_{i∈S} w_i(x_t, t) ε_i(x_t, t), as a denoiser wrapper.

Two sources of the weights w (DESIGN.md, "Weights"):

- ``router``: a noisy classifier p(i | x_t, t) (the CDM paper's way; the one shared model).
- ``density``: compartment-pure weights from the Itô density estimator of SuperDiff (arXiv 2412.17762):
  each compartment's log q_t^i(x_t) is tracked along the sampling trajectory and w = softmax_i(log q_t^i + log λ_i).
  Only the allowed compartments' own denoisers are ever evaluated, so excluded compartments have no influence at all.

The Itô estimator (reverse time τ, forward SDE dx = f dt + g dW, VP: f = -½βx, g² = β) gives per step
    Δ log q^i = ⟨Δx, s_i⟩ − ½B⟨x, s_i⟩ − ½B‖s_i‖²,   s_i = −ε_i(x, t)/sqrt(1 − ᾱ_t),   B = log(ᾱ_s / ᾱ_t)
(the compartment-independent divergence term cancels in the softmax). It holds for stochastic (DDPM) sampling only:
on a deterministic (DDIM) path the divergence of each score would be needed, so ``density`` requires ``ddpm``.

Top-k: per sample and step only the k heaviest compartments are evaluated (each compartment once, on its sub-batch) and
w is renormalized over them. With ``batched`` (:class:`dataward.diffusion.batched.StackedDenoisers`) the compartments of
one step run in one vectorized call instead of a loop. With ``density`` the skipped compartments' log-densities are not advanced at that step.
"""

from __future__ import annotations

from typing import Callable

import torch

from dataward.config import WeightsName
from dataward.diffusion.sampling import Denoiser

# router(x_t, t) -> logits (N, K_all) over every compartment the router was trained on
Router = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ComposedDenoiser:
    """ε = Σ_i w_i ε_i over the given compartments; records trajectory-averaged and final weights (attribution).

    ``denoisers`` and ``log_prior`` (N, K) are for the allowed compartments only, in compartment order.
    ``router_columns`` maps them to the router's output columns (router weights only). One instance per trajectory.
    """

    def __init__(
        self,
        denoisers: list[Denoiser],
        log_prior: torch.Tensor,  # (N, K) log λ_i, per sample (depends on the sample's label)
        alpha_bar: torch.Tensor,
        weights: WeightsName = "density",
        router: Router | None = None,
        router_columns: list[int] | None = None,
        top_k: int | None = None,
        batched: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor] | None = None,
    ):
        if weights == "router" and (router is None or router_columns is None):
            raise ValueError("router weights need a router and its columns")
        self.denoisers = denoisers
        self.log_prior = log_prior
        self.alpha_bar = alpha_bar
        self.weights = weights
        self.router = router
        self.router_columns = router_columns
        self.top_k = None if top_k is None or top_k >= len(denoisers) else top_k
        self.batched = batched  # (x_t, t, y, mask (N, K)) -> ε (K, N, ...): all compartments in one call, instead of the loop
        self.log_q = torch.zeros_like(log_prior)  # (N, K) tracked log q_t^i(x_t), up to a shared constant
        self._last: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None  # x, t, eps (K, N, C, H, W), evaluated (N, K)
        self.weight_sum = torch.zeros_like(log_prior)
        self.final_weights = torch.zeros_like(log_prior)
        self.calls = 0

    def _advance_density(self, x: torch.Tensor, t: int) -> None:
        """Itô update of log q^i from the previous call's (x, t, ε_i) to the current x."""
        if self._last is None:
            return
        x_prev, t_prev, eps, evaluated = self._last
        ab_t, ab_s = self.alpha_bar[t_prev], self.alpha_bar[t]
        big_b = torch.log(ab_s / ab_t)
        dx = (x - x_prev).flatten(1)  # (N, D)
        s = -eps.flatten(2) / (1.0 - ab_t).sqrt()  # (K, N, D)
        delta = (dx[None] * s).sum(-1) - 0.5 * big_b * (x_prev.flatten(1)[None] * s).sum(-1) - 0.5 * big_b * s.pow(2).sum(-1)  # (K, N)
        self.log_q += delta.T * evaluated

    def current_weights(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """w (N, K) over the allowed compartments at (x_t, t)."""
        if self.weights == "router":
            logits = self.router(x, t)[:, self.router_columns]
            return torch.softmax(logits + self.log_prior, dim=1)
        return torch.softmax(self.log_q + self.log_prior, dim=1)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        t_int = int(t)
        if self.weights == "density":
            self._advance_density(x_t, t_int)
        w = self.current_weights(x_t, t)  # (N, K)
        k_all = len(self.denoisers)
        if self.top_k is not None:
            top = torch.topk(w, self.top_k, dim=1).indices
            mask = torch.zeros_like(w).scatter_(1, top, 1.0)
            w = w * mask
            w = w / w.sum(dim=1, keepdim=True)
        else:
            mask = torch.ones_like(w)
        if self.batched is not None:
            eps = self.batched(x_t, t, y, mask)
        else:
            eps = torch.zeros((k_all,) + tuple(x_t.shape), dtype=x_t.dtype, device=x_t.device)
            for i, denoiser in enumerate(self.denoisers):
                rows = mask[:, i].nonzero().flatten()
                if len(rows) == len(x_t):
                    eps[i] = denoiser(x_t, t, y)
                elif len(rows):
                    eps[i, rows] = denoiser(x_t[rows], t, None if y is None else y[rows])
        out = (w.T.reshape(k_all, -1, *([1] * (x_t.ndim - 1))) * eps).sum(dim=0)  # (N, C, H, W)
        self._last = (x_t, t_int, eps, mask)
        self.weight_sum += w
        self.final_weights = w
        self.calls += 1
        return out

    def attribution(self) -> torch.Tensor:
        """Trajectory-averaged weights (N, K); rows sum to 1."""
        return self.weight_sum / max(self.calls, 1)
