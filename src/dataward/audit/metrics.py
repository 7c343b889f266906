"""Audit metrics of quality, replication and privacy: pure functions on tensors.

Images are (N, C, H, W) in [-1, 1] unless a docstring says otherwise; features are (N, D).

- :func:`frechet_distance`: Fréchet distance between two feature sets (FID with the caller's feature network).
- :func:`downstream_accuracy`: classifier accuracy score (CAS): train on generated class-conditional samples only,
  test on held-out real images.
- :func:`replication`: nearest / second-nearest training L2 distance and the Gu et al. (2023) ratio test, plus
  feature-space cosine similarity to the nearest training image (CPSample's protocol).
- :func:`recompute_epsilon`: ε of DP-SGD from its recorded history, by an independent accountant.

Membership inference attacks live in :mod:`dataward.audit.attacks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from dataward.errors import DatawardError

FeatureFn = Callable[[torch.Tensor], torch.Tensor]  # images (N, C, H, W) in [-1, 1] -> (N, D)

REPLICATION_RATIO = 1.0 / 3.0  # Gu et al. 2023: replicated if d(nearest) / d(second nearest) < 1/3
COSINE_THRESHOLD = 0.975  # centered feature cosine above this counts as a near copy (~1% of held-out digits; docs/audit.md)


# ----------------------------------------------------------------------------------------------------------- quality


def _as_matrix(feats: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    x = torch.as_tensor(feats).detach().to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise DatawardError(f"{name} must be (N, D) features with N >= 2, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DatawardError(f"{name} contains NaN or inf")
    return x


def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    values, vectors = torch.linalg.eigh((a + a.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D) (Heusel et al. 2017).

    FD = ||μ_a − μ_b||² + Tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½), in float64. The matrix square root is taken of the
    symmetric form Σ_a^½ Σ_b Σ_a^½ by eigendecomposition, which has the same trace as (Σ_a Σ_b)^½ and is stable.
    Unbiased (N − 1) covariances, so FD of a set with itself is 0 up to rounding.
    """
    a, b = _as_matrix(feats_a, "feats_a"), _as_matrix(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise DatawardError(f"feature sizes differ: feats_a has D={a.shape[1]}, feats_b has D={b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = torch.cov(a.T).reshape(a.shape[1], a.shape[1]), torch.cov(b.T).reshape(b.shape[1], b.shape[1])
    root_a = _sqrtm_psd(sigma_a)
    covmean_trace = torch.linalg.eigvalsh(root_a @ sigma_b @ root_a).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + torch.trace(sigma_a) + torch.trace(sigma_b) - 2 * covmean_trace
    return float(fd.clamp_min(0))


def downstream_accuracy(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    features: FeatureFn | None = None,
    seed: int = 0,
) -> float:
    """Classification accuracy score (CAS, Ravuri & Vinyals 2019): train on (generated) ``train_images`` only, test on real.

    The classifier is scikit-learn's multinomial logistic regression (deterministic lbfgs, ``random_state=seed``) on
    standardized pixels, or on ``features(images)`` if given. Returns accuracy on ``test_images`` in [0, 1].
    Training on real training data gives the reference the generated-data score should approach.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if train_labels is None or len(torch.unique(torch.as_tensor(train_labels))) < 2:
        raise DatawardError("downstream accuracy needs class-conditional samples with at least two labels")
    embed = (lambda x: features(x)) if features is not None else (lambda x: x.flatten(1))
    with torch.no_grad():
        x_train = embed(train_images.float()).double().numpy()
        x_test = embed(test_images.float()).double().numpy()
    classifier = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    classifier.fit(x_train, torch.as_tensor(train_labels).numpy())
    return float((classifier.predict(x_test) == torch.as_tensor(test_labels).numpy()).mean())


# ------------------------------------------------------------------------------------------------------- replication


@dataclass
class Replication:
    """Per generated image: nearest training images and whether it is a replica. Arrays are numpy, length N (generated)."""

    nearest_l2: np.ndarray  # (N,) L2 distance (pixel space) to the nearest training image
    second_l2: np.ndarray  # (N,) L2 distance to the second-nearest training image
    ratio: np.ndarray  # (N,) nearest_l2 / second_l2
    nearest_index: np.ndarray  # (N,) row of the nearest training image (L2)
    replicated: np.ndarray  # (N,) bool: ratio < ratio_threshold (Gu et al. 2023)
    replication_rate: float  # share of generated images that are replicated
    ratio_threshold: float
    cosine: np.ndarray | None  # (N,) max feature cosine similarity to a training image (None without features)
    cosine_index: np.ndarray | None  # (N,) row of the training image with that cosine
    cosine_threshold: float
    cosine_share: float | None  # share of generated images with cosine > cosine_threshold
    closest: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # generated rows with the smallest ratio, ascending

    def summary(self) -> dict:
        """JSON-ready scalars (see docs/audit.md, ``replication``)."""
        return {
            "replication_rate": self.replication_rate,
            "ratio_threshold": self.ratio_threshold,
            "replicated": int(self.replicated.sum()),
            "nearest_l2_median": float(np.median(self.nearest_l2)),
            "ratio_min": float(self.ratio.min()),
            "ratio_median": float(np.median(self.ratio)),
            "cosine_threshold": self.cosine_threshold,
            "cosine_share": self.cosine_share,
            "cosine_median": None if self.cosine is None else float(np.median(self.cosine)),
            "cosine_max": None if self.cosine is None else float(self.cosine.max()),
            "closest_pairs": [
                {"generated": int(i), "train": int(self.nearest_index[i]), "ratio": float(self.ratio[i]), "nearest_l2": float(self.nearest_l2[i])}
                for i in self.closest
            ],
        }


def _nearest_two(query: torch.Tensor, reference: torch.Tensor, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances (M, 2) and indices (M, 2) of the two nearest reference rows (L2) for each query row."""
    values, indices = [], []
    for q in query.split(chunk):
        d = torch.cdist(q, reference)  # (m, R)
        v, i = d.topk(2, dim=1, largest=False)
        values.append(v)
        indices.append(i)
    return torch.cat(values), torch.cat(indices)


def replication(
    generated: torch.Tensor,
    train: torch.Tensor,
    *,
    features: FeatureFn | None = None,
    ratio_threshold: float = REPLICATION_RATIO,
    cosine_threshold: float = COSINE_THRESHOLD,
    center: bool = True,
    top_k: int = 8,
) -> Replication:
    """Replication of training images by ``generated`` (N, C, H, W) vs ``train`` (M, C, H, W), both in [-1, 1].

    Gu et al. 2023 (*On Memorization in Diffusion Models*): a generated image is replicated if the L2 distance to its
    nearest training image is less than ``ratio_threshold`` (1/3) times the distance to the second-nearest. With a
    feature network, also the cosine similarity of features to the most similar training image and the share above
    ``cosine_threshold`` (CPSample's protocol, after Somepalli et al. 2023); features are centered by the training mean
    unless ``center=False``. With the digits feature net pass ``net.copy_features`` (the calibrated default threshold
    is for those). ``closest`` holds the ``top_k`` generated
    rows with the smallest ratio, for showing the pairs. Needs at least two training images.
    """
    if generated.ndim != 4 or train.ndim != 4 or generated.shape[1:] != train.shape[1:]:
        raise DatawardError(f"generated {tuple(generated.shape)} and train {tuple(train.shape)} must be (N, C, H, W) of the same image shape")
    if len(train) < 2:
        raise DatawardError("replication needs at least two training images (nearest and second-nearest)")
    g, r = generated.detach().flatten(1).double(), train.detach().flatten(1).double()
    dist, idx = _nearest_two(g, r)
    nearest, second = dist[:, 0].numpy(), dist[:, 1].numpy()
    ratio = nearest / np.maximum(second, 1e-12)
    replicated = ratio < ratio_threshold
    cosine = cosine_index = None
    cosine_share = None
    if features is not None:
        with torch.no_grad():
            fr = features(train.float()).double()
            mu = fr.mean(0) if center else torch.zeros_like(fr[0])  # centering: cosine of deviations from the typical image
            fg = torch.nn.functional.normalize(features(generated.float()).double() - mu, dim=1)
            fr = torch.nn.functional.normalize(fr - mu, dim=1)
        sims = torch.cat([(chunk @ fr.T).max(dim=1, keepdim=True)[0] for chunk in fg.split(2048)]).squeeze(1)
        cosine_index = torch.cat([(chunk @ fr.T).argmax(dim=1) for chunk in fg.split(2048)]).numpy()
        cosine = sims.numpy()
        cosine_share = float((cosine > cosine_threshold).mean())
    closest = np.argsort(ratio, kind="stable")[: max(0, top_k)]
    return Replication(
        nearest_l2=nearest, second_l2=second, ratio=ratio, nearest_index=idx[:, 0].numpy(), replicated=replicated,
        replication_rate=float(replicated.mean()), ratio_threshold=ratio_threshold, cosine=cosine, cosine_index=cosine_index,
        cosine_threshold=cosine_threshold, cosine_share=cosine_share, closest=closest,
    )


# ---------------------------------------------------------------------------------------------------------- privacy


def recompute_epsilon(history: Sequence[Sequence[float]], delta: float, accountant: str = "prv") -> float:
    """ε of DP-SGD from its accountant history ``[(sigma, sample_rate, steps), ...]`` (Poisson sampling rate q, noise
    multiplier σ) at ``delta``, by an opacus accountant (``prv``: Gopi et al. 2021, ``rdp``: Mironov 2017). The audit
    uses the accountant the training did not use, as an independent check of the recorded ε."""
    from dataward.training.privacy import history_epsilon

    if accountant not in ("prv", "rdp"):
        raise DatawardError(f"unknown accountant {accountant!r}: expected prv or rdp")
    phases = tuple((float(s), float(q), int(k)) for s, q, k in history)
    if not phases or not 0 < delta < 1 or any(s <= 0 or not 0 < q <= 1 or k < 1 for s, q, k in phases):
        raise DatawardError(f"bad DP history or delta: history (sigma, q, steps) = {list(phases)}, delta = {delta}")
    return history_epsilon(phases, float(delta), accountant)
