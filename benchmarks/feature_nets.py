"""The pinned feature nets of the audit's FD on 28x28 images (issue 31): trained on the fixed test split, measured on the training split.

Figures: BENCHMARKS.md, section "Real images (MNIST, Fashion-MNIST)".

    python benchmarks/feature_nets.py [--write mnist,fashion-mnist] [--names mnist,fashion-mnist]

Each net is :class:`dataward.audit.classifier.ImageCNN` trained with the recipe in
``dataward.audit.features.BENCHMARK_FEATURE_NETS`` (2 threads, seeded) on ``<name>:split=test`` only: a ward's data
comes from the training split, so the net never sees the private set it evaluates (a net trained on the other data set
would not describe these images: digits features for clothes). Its weights are rounded to float16 (under 1 MB, kept in
the package at ``src/dataward/audit/weights/``); the held-out accuracy is that of the rounded weights on every image of
``<name>:split=train`` (real images the net never saw). ``--write`` saves the weights and their JSON there (then paste
the printed SHA-256 into BENCHMARK_FEATURE_NETS); without it the run checks that it reproduces the pinned bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import torch
from safetensors.torch import save

from dataward.audit.classifier import classifier_accuracy, train_classifier
from dataward.audit.features import BENCHMARK_FEATURE_NETS, WEIGHTS_DIR
from dataward.data import ids_hash, load_source


def make(name: str, write: bool) -> dict:
    """Train one net, round it to float16, measure it; write its files when asked. Returns its table row's values."""
    recipe = BENCHMARK_FEATURE_NETS[name]
    train, heldout = load_source(recipe.train), load_source(recipe.heldout)
    started = time.perf_counter()
    module = train_classifier(train.images, train.labels, recipe.config)
    seconds = time.perf_counter() - started
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    blob = save(state)
    module.load_state_dict({k: v.float() for k, v in state.items()})
    row = {
        "net": f"{name}-cnn", "train": recipe.train, "train_images": len(train), "train_ids_sha256": ids_hash(train.ids),
        "heldout": recipe.heldout, "heldout_images": len(heldout), "heldout_accuracy": classifier_accuracy(module, heldout.images, heldout.labels),
        "train_accuracy": classifier_accuracy(module, train.images, train.labels), "config": recipe.config.__dict__,
        "sha256": hashlib.sha256(blob).hexdigest(), "pinned": hashlib.sha256(blob).hexdigest() == recipe.sha256,
        "seconds": round(seconds, 1), "bytes": len(blob), "torch": torch.__version__,
    }
    if write:
        WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
        (WEIGHTS_DIR / f"{name}-cnn.safetensors").write_bytes(blob)
        meta = {k: row[k] for k in ("net", "train", "train_images", "train_ids_sha256", "heldout", "heldout_images",
                                    "heldout_accuracy", "train_accuracy", "config", "torch")}
        (WEIGHTS_DIR / f"{name}-cnn.json").write_text(json.dumps(meta, indent=2) + "\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--names", default=",".join(BENCHMARK_FEATURE_NETS))
    parser.add_argument("--write", default="", help="names whose weights and JSON to (re)write into the package")
    args = parser.parse_args()
    written = set(filter(None, args.write.split(",")))
    print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}, 2 threads")
    print("| net | trained on | images | held-out accuracy (images) | training accuracy | seconds | size | weights sha256 (pinned?) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in filter(None, args.names.split(",")):
        r = make(name, name in written)
        print(f"| {r['net']} | `{r['train']}` | {r['train_images']:,} | {100 * r['heldout_accuracy']:.2f}% (`{r['heldout']}`, {r['heldout_images']:,}) | "
              f"{100 * r['train_accuracy']:.2f}% | {r['seconds']} | {r['bytes'] / 1024:.0f} KiB | {r['sha256'][:12]} ({'yes' if r['pinned'] else 'no'}) |", flush=True)


if __name__ == "__main__":
    main()
