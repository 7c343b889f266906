"""Soups (``--weights soup``, exports): one model whose weights are the data-share-weighted average of compartments
fine-tuned from one base. A soup is not a mixture: it is sampled as one model, without per-compartment densities."""

from __future__ import annotations

import copy

import torch

from dataward.errors import DatawardError


def average_models(models: list[torch.nn.Module], shares: list[float]) -> torch.nn.Module:
    """A *soup*: one model holding Σ_i share_i θ_i (shares normalized) of models of one architecture, fine-tuned from one base."""
    states = [m.state_dict() for m in models]
    keys = list(states[0])
    if any(list(s) != keys or any(s[k].shape != states[0][k].shape for k in keys) for s in states[1:]):
        raise DatawardError("soup needs compartments of one architecture (fine-tuned from the ward's base)")
    total = float(sum(shares))
    out = {}
    for key in keys:
        if states[0][key].is_floating_point():
            out[key] = sum(s[key] * (share / total) for s, share in zip(states, shares))
        else:
            out[key] = states[0][key].clone()
    soup = copy.deepcopy(models[0])
    soup.load_state_dict(out)
    return soup.eval()
