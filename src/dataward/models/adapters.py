"""Low-rank adapters (LoRA, via peft) on a ward's base: what a compartment trains and stores with ``adapter="lora:RANK"``.

A compartment's denoiser is the base plus its adapter: LoRA on every convolution and linear layer of the UNet (rank r,
scale alpha / r = 1), and its own class embedding (a small table, trained in full: the class is the strongest signal a
compartment has). Only these tensors train and only they are saved (``adapter_model.safetensors`` and
``adapter_config.json`` in the checkpoint folder); loading merges them into a copy of the base, so sampling, soups and
exports see an ordinary ``UNet2DModel``. Both layers of a LoRA pair are ``nn.Linear`` / ``nn.Conv2d``, so opacus computes
their per-sample gradients as for any other layer (DP fine-tunes the adapter: DP-LDM's recipe in its modern form).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from dataward.errors import DatawardError
from dataward.models.nets import seeded_init
from dataward.store.checkpoints import ADAPTER_FILE

ADAPTER_CONFIG = "adapter_config.json"
# every convolution and linear layer of a diffusers UNet2DModel (attention projections, resnets, time embedding, in/out)
LORA_TARGETS = r".*(conv_in|conv_out|conv1|conv2|conv_shortcut|conv|time_emb_proj|linear_1|linear_2|to_q|to_k|to_v|to_out\.0)$"
FULL_TRAINED = "class_embedding."  # trained in full next to the adapter


def is_adapter_name(name: str) -> bool:
    """Whether a parameter of a model with an adapter is the compartment's own (trained and saved)."""
    return "lora_" in name or name.startswith(FULL_TRAINED)


def add_lora(base: torch.nn.Module, rank: int, seed: int) -> torch.nn.Module:
    """A copy of ``base`` with a fresh rank-``rank`` adapter (A drawn from ``seed``, B zero: it starts as the base)."""
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True)
    model = seeded_init(lambda: inject_adapter_in_model(config, copy.deepcopy(base)), seed)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter_name(name))
    return model


class AdapterCheckpoint:
    """The part of a model with an adapter that a checkpoint folder stores (duck-typed ``save_pretrained``)."""

    def __init__(self, model: torch.nn.Module, rank: int):
        self.model = model
        self.rank = rank

    def save_pretrained(self, folder: str, safe_serialization: bool = True) -> None:
        """Write ``adapter_model.safetensors`` (the adapter's tensors by name) and ``adapter_config.json``."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in self.model.named_parameters() if is_adapter_name(name)}
        save_file(tensors, str(path / ADAPTER_FILE))
        (path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": self.rank, "lora_alpha": self.rank,
                                                       "target_modules": LORA_TARGETS, "full": [FULL_TRAINED]}, indent=2))


def load_merged(base: torch.nn.Module, folder: Path, rank: int) -> torch.nn.Module:
    """The base with the adapter of ``folder`` merged in: a plain copy of the base's class, in eval mode."""
    model = add_lora(base, rank, seed=0)
    tensors = load_file(str(Path(folder) / ADAPTER_FILE))
    expected = {name for name, _ in model.named_parameters() if is_adapter_name(name)}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise DatawardError(f"the adapter in {folder} does not fit the base: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
    merged = copy.deepcopy(base)
    merged.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k})
    return merged.eval()
