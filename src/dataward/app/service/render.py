"""Rendering a generation's result as the JSON body of a response: images (PNG or npz, base64) and attribution."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image

from dataward.app.service.api import ApiKey, GenerateRequest
from dataward.sampling.plan import SampleResult


def render_result(result: SampleResult, body: GenerateRequest, key: ApiKey, seed: int, known: list[int]) -> bytes:
    """The JSON response body: images (PNG or npz, base64) and per-sample attribution over the key's compartments only."""
    cols = [known.index(c) for c in key.allow]
    attribution = result.attribution  # (N, K_all)
    outside = float(attribution.sum() - attribution[:, cols].sum())
    if abs(outside) > 1e-5 or any(c not in key.allow for c in result.compartments):
        raise RuntimeError(f"attribution outside the key's grant ({outside}); refusing to answer")  # must never happen
    labels = None if result.labels is None else result.labels.tolist()
    samples = []
    for i in range(result.images.shape[0]):
        entry: dict[str, Any] = {
            "label": None if labels is None else labels[i],
            "attribution": {str(c): float(attribution[i, known.index(c)]) for c in key.allow},
            "final_weights": {str(c): float(result.final_weights[i, known.index(c)]) for c in key.allow},
        }
        if body.format == "png" and not body.grid:
            entry["png"] = _png(_to_uint8(result.images[i]))
        samples.append(entry)
    out: dict[str, Any] = {
        "n": body.n, "seed": seed, "steps": body.steps, "sampler": result.sampler, "weights": result.weights,
        "compartments": result.compartments, "allowed": list(key.allow),
        "models": {str(c): info for c, info in result.models.items()},
        "shared_models": ["router"] if result.weights == "router" else [],
        "format": body.format, "seconds": round(result.seconds, 4), "guard_guided": result.guard_guided, "samples": samples,
    }
    if body.format == "png" and body.grid:
        from dataward.plots import grid_array, grid_scale

        out["grid_png"] = _png(grid_array(result.images, scale=grid_scale(result.images.shape[-1]), pad=2))
    if body.format == "npz":
        arrays = {"images": result.images.numpy().astype(np.float32), "attribution": attribution[:, cols].numpy(),
                  "final_weights": result.final_weights[:, cols].numpy(), "compartments": np.array(list(key.allow), dtype=np.int64)}
        if result.labels is not None:
            arrays["labels"] = result.labels.numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        out["npz"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return json.dumps(out, allow_nan=False).encode()  # never invalid JSON (NaN): a ValueError is the service's 500


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) or (H, W, C) uint8."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else array


def _png(array: np.ndarray) -> str:
    """A base64 PNG of (H, W) or (H, W, C) uint8."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")

