"""K compartments' UNets evaluated in one vectorized call (``torch.func``) instead of K calls: ``Ward.sample(batched=True)``.

Measured on the 2-core CPU (BENCHMARKS.md, "Compartments from a base"), the loop is faster (top-1 density: batched 7.3x a
single model's time, loop 1.9x): vmap's per-op overhead outweighs the saved calls at 8x8. It is kept, off by default,
for accelerators where one launch per layer instead of K is expected to pay (not measured here).

The K models share one architecture (they are fine-tuned from one base, or built from one preset); their weights are
stacked (``stack_module_state``) and one template runs under ``vmap``. Two of the template's layers are swapped for
forms ``vmap`` can batch: group norm written out (torch's kernel asks for a memory format vmap cannot answer) and
attention as softmax(QKᵀ)V (``AttnProcessor``; SDPA has no batching rule on CPU). The results equal the per-model loop
within float tolerance (tests/test_sampling.py), not bitwise.

Top-k: only the rows each compartment must evaluate are gathered, padded to the largest group, and run in one call.
"""

from __future__ import annotations

import copy

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from torch.func import functional_call, stack_module_state


class _WrittenOutGroupNorm(torch.nn.GroupNorm):
    """``nn.GroupNorm`` with the same parameters, computed from means and variances (batchable by vmap)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        groups = x.reshape(shape[0], self.num_groups, -1)
        mean = groups.mean(-1, keepdim=True)
        var = groups.var(-1, unbiased=False, keepdim=True)
        x = ((groups - mean) / torch.sqrt(var + self.eps)).reshape(shape)
        view = (1, shape[1]) + (1,) * (len(shape) - 2)
        return x * self.weight.reshape(view) + self.bias.reshape(view)


def _batchable(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``model`` whose layers vmap can batch (its weights are replaced by the stacked ones)."""
    template = copy.deepcopy(model)
    for module in template.modules():
        if type(module) is torch.nn.GroupNorm:
            module.__class__ = _WrittenOutGroupNorm
        elif isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    return template.eval()


class StackedDenoisers:
    """ε_i(x_t, t, y) of K UNet2DModels of one architecture, in one call."""

    def __init__(self, models: list[torch.nn.Module]):
        self.size = len(models)
        self.params, self.buffers = stack_module_state(models)
        template = _batchable(models[0])

        def one(params, buffers, x, t, y):
            return functional_call(template, (params, buffers), (x, t), {"class_labels": y}).sample

        self._all = torch.vmap(one, in_dims=(0, 0, None, None, None))  # every model on the same x_t
        self._rows = {True: torch.vmap(one, in_dims=(0, 0, 0, None, 0)), False: torch.vmap(one, in_dims=(0, 0, 0, None, None))}

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """ε (K, N, C, H, W) where ``mask`` (N, K) is 1, zeros elsewhere."""
        with torch.no_grad():
            if bool(mask.all()):
                return self._all(self.params, self.buffers, x_t, t, y)
            counts = mask.sum(dim=0).long()  # rows per compartment
            width = max(int(counts.max()), 1)
            index = torch.zeros(self.size, width, dtype=torch.long)
            for i in range(self.size):  # each compartment's rows, padded with row 0 (computed, then dropped)
                rows = mask[:, i].nonzero().flatten()
                index[i, : len(rows)] = rows
            xs = x_t[index]  # (K, W, C, H, W)
            ys = None if y is None else y[index]
            out_rows = self._rows[ys is not None](self.params, self.buffers, xs, t, ys)
            eps = torch.zeros((self.size,) + tuple(x_t.shape), dtype=x_t.dtype)
            for i in range(self.size):
                n = int(counts[i])
                if n:
                    eps[i, index[i, :n]] = out_rows[i, :n]
            return eps
