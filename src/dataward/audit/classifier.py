"""A small CNN for 28x28 grey images (MNIST, Fashion-MNIST), trained deterministically: the feature network of the
audit's FD on those images and the fixed classifier of the DPImageBench utility protocol.

- :class:`ImageCNN`: three 3x3 conv layers (28 -> 14 -> 7 -> 3 px) and a ``feature_dim`` penultimate layer.
- :func:`train_classifier`: AdamW with a one-cycle schedule, random shifts (and flips) drawn from a seeded generator,
  weights drawn inside ``torch.random.fork_rng``, a fixed thread count: the same bytes for the same inputs and torch.
- :func:`synthetic_accuracy`: the DPImageBench protocol (Chen et al. 2025, arXiv 2503.14681): train the classifier on
  labelled synthetic images only, report its accuracy on the real test split; the same call on the real training
  split gives the ceiling.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch

from dataward.data import fit_images
from dataward.errors import DatawardError

SIDE = 28  # the images these networks read: 1 x 28 x 28 in [-1, 1]


@dataclass(frozen=True)
class ClassifierConfig:
    """How an :class:`ImageCNN` is built and trained. Saved as JSON next to the weights it produced."""

    width: int = 32  # channels of the first conv; then 2 * width and 4 * width
    feature_dim: int = 64  # the penultimate layer: the features of FD
    epochs: int = 10  # passes over the training images
    batch_size: int = 128  # examples per AdamW step
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    max_shift: int = 2  # random translation in pixels (background padding), drawn from the seeded generator
    flip: bool = False  # random horizontal flips as well (clothes: yes; digits: no)
    dropout: float = 0.2  # before the penultimate layer
    seed: int = 0  # seeds the initial weights, the data order and the augmentation
    threads: int = 2  # torch intra-op threads while training: part of the determinism contract

    def key(self) -> str:
        """12 hex digits of the SHA-256 of this config."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class ImageCNN(torch.nn.Module):
    """``features(x) -> (N, feature_dim)``, ``spatial(x) -> (N, 2 * width * 49)`` (for copy detection) and
    ``forward(x) -> logits (N, num_classes)`` of images (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # 28 -> 14
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # 14 -> 7
            torch.nn.Conv2d(2 * width, 4 * width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),  # 7 -> 3
            torch.nn.Flatten(), torch.nn.Dropout(dropout),
            torch.nn.Linear(4 * width * 9, feature_dim), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim)."""
        return self.body(x)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """Where the strokes are: the second conv layer's pooled maps, flattened (N, 2 * width * 7 * 7)."""
        return self.body[:6](x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def fit28(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) as the networks read them: grey, 28x28."""
    if images.ndim != 4:
        raise DatawardError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    return fit_images(images.float(), 1, SIDE, SIDE)


def augment(x: torch.Tensor, config: ClassifierConfig, generator: torch.Generator) -> torch.Tensor:
    """Random shifts by up to ``max_shift`` pixels (padding with the background, -1) and, with ``flip``, mirror images."""
    n, _, h, w = x.shape
    if config.max_shift > 0:
        s = config.max_shift
        padded = torch.nn.functional.pad(x, (s,) * 4, value=-1.0)
        dx = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * s + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
        x = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    if config.flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(-1), x)
    return x


def train_classifier(images: torch.Tensor, labels: torch.Tensor, config: ClassifierConfig = ClassifierConfig(),
                     num_classes: int = 10) -> ImageCNN:
    """An :class:`ImageCNN` trained from scratch on ``images`` (N, C, H, W) in [-1, 1] and ``labels`` (N,), deterministically."""
    x, y = fit28(images), torch.as_tensor(labels, dtype=torch.long)
    if len(x) != len(y) or len(x) == 0:
        raise DatawardError(f"the classifier needs one label per image and at least one image, got {len(x)} images and {len(y)} labels")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            module = ImageCNN(config.width, config.feature_dim, num_classes, config.dropout)
            # dropout draws from the global generator: seeded here, inside the fork, so it never leaks out
            optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=False)
            generator = torch.Generator().manual_seed(config.seed)
            steps_per_epoch = -(-len(x) // config.batch_size)
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
            module.train()
            for _ in range(config.epochs):
                for rows in torch.randperm(len(x), generator=generator).split(config.batch_size):
                    loss = torch.nn.functional.cross_entropy(module(augment(x[rows], config, generator)), y[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
    finally:
        torch.set_num_threads(previous_threads)
    return module.eval()


@torch.no_grad()
def classifier_accuracy(module: ImageCNN, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Share of ``images`` (N, C, H, W) in [-1, 1] the classifier labels as ``labels`` (N,)."""
    module.eval()
    predicted = torch.cat([module(fit28(chunk)).argmax(1) for chunk in images.split(batch_size)])
    return float((predicted == torch.as_tensor(labels)).float().mean())


def synthetic_accuracy(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor,
                       config: ClassifierConfig = ClassifierConfig(), num_classes: int = 10) -> float:
    """The DPImageBench utility protocol: :class:`ImageCNN` trained on ``train_images`` (the synthetic images and their
    labels) with ``config``, its accuracy on the real ``test_images``. On the real training split: the ceiling."""
    if len(torch.unique(torch.as_tensor(train_labels))) < 2:
        raise DatawardError("the synthetic-trained classifier needs labelled images of at least two classes")
    return classifier_accuracy(train_classifier(train_images, train_labels, config, num_classes), test_images, test_labels)
