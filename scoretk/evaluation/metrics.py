"""Sample-quality figures from features: FID, KID, IS, k-NN precision/recall, density/coverage.

FID, KID and IS are torch-fidelity's functions (the maths the usual tools share: FID's trace
term from the eigenvalues of S1 S2, KID as the unbiased MMD with the cubic polynomial kernel over
random subsets, IS over 10 splits), so our figures are theirs for the same features. Precision
and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020) share one set
of k-NN balls; they are computed together here, chunk by chunk, so memory grows with one
chunk of distances rather than N^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

K_NEIGHBOURS = 3
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
IS_SPLITS = 10
CHUNK = 1024


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance (float64) of a feature set: all FID needs of it."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def gaussian_stats(features: Tensor) -> GaussianStats:
    """Mean, then the centred covariance, each accumulated chunk by chunk in float64 (no
    float64 copy of the whole set)."""
    n = len(features)
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 items, got {n}")
    mu = sum(c.double().sum(0) for c in features.split(CHUNK)) / n
    scatter = sum((c.double() - mu).T @ (c.double() - mu) for c in features.split(CHUNK))
    return GaussianStats(mu.numpy(), (scatter / (n - 1)).numpy(), n)


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    out = fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma},
                                   {"mu": b.mu, "sigma": b.sigma}, verbose=False)
    return float(out[KEY_METRIC_FID])


def kernel_distance(fake: Tensor, real: Tensor, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation over `subsets` random subset pairs. The subset size
    shrinks to the smaller set when either has fewer items (then not comparable with figures
    at 1,000)."""
    from torch_fidelity.metric_kid import (KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD,
                                           kid_features_to_metric)

    size = min(subset_size, len(fake), len(real))
    out = kid_features_to_metric(fake, real, kid_subsets=subsets, kid_subset_size=size,
                                 rng_seed=seed, verbose=False)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def inception_score(logits: Tensor, splits: int = IS_SPLITS, seed: int = 0
                    ) -> tuple[float, float]:
    """exp(E KL(p(y|x) || p(y))): mean and standard deviation over `splits` splits."""
    from torch_fidelity.metric_isc import (KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD,
                                           isc_features_to_metric)

    out = isc_features_to_metric(logits, splits=min(splits, len(logits)), rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


def _chunked(a: Tensor, b: Tensor, fn) -> list:
    """fn(distances from a chunk of rows of a to all of b) for each chunk."""
    return [fn(torch.cdist(a[i:i + CHUNK], b)) for i in range(0, len(a), CHUNK)]


def knn_radii(x: Tensor, k: int = K_NEIGHBOURS) -> Tensor:
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded)."""
    if len(x) <= k:
        raise ValueError(f"k-NN radii with k = {k} need more than {k} items, got {len(x)}")
    return torch.cat(_chunked(x, x, lambda d: d.kthvalue(k + 1, dim=1).values))


def manifold_metrics(fake: Tensor, real: Tensor, k: int = K_NEIGHBOURS,
                     real_radii: Tensor | None = None) -> dict[str, float]:
    """Precision (fakes inside the real balls), recall (reals inside the fake balls), density
    (how many real balls hold each fake, / k) and coverage (real balls holding a fake).

    Balls are centred on each point with its k-th neighbour's distance as radius. Pass
    `real_radii` (from `knn_radii(real, k)`) to score several fake sets against one real set.
    """
    if real_radii is None:
        real_radii = knn_radii(real, k)
    per_chunk = _chunked(fake, real, lambda d: _ball_counts(d <= real_radii[None]))
    fake_radii = knn_radii(fake, k)
    recalled = torch.cat(_chunked(real, fake, lambda d: (d <= fake_radii[None]).any(1)))
    return {
        "precision": sum(c[0] for c in per_chunk) / len(fake),
        "recall": float(recalled.double().mean()),
        "density": sum(c[1] for c in per_chunk) / (k * len(fake)),
        "coverage": float(torch.stack([c[2] for c in per_chunk]).any(0).double().mean()),
    }


def _ball_counts(inside: Tensor) -> tuple[int, int, Tensor]:
    """From (fakes x real balls) membership: fakes in some ball, memberships, balls hit."""
    return int(inside.any(1).sum()), int(inside.sum()), inside.any(0)


def knn_classify(query: Tensor, train: Tensor, labels: Tensor, k: int = 5) -> Tensor:
    """Majority vote of the k nearest training items (ties go to the nearest one's class): no
    training step, and on the digits as accurate as a linear classifier."""
    num_classes = int(labels.max()) + 1
    nn_idx = torch.cat(_chunked(query, train, lambda d: d.topk(min(k, d.shape[1]), dim=1,
                                                               largest=False).indices))
    votes = torch.nn.functional.one_hot(labels[nn_idx], num_classes).sum(1).double()
    votes[torch.arange(len(nn_idx)), labels[nn_idx[:, 0]]] += 0.5
    return votes.argmax(1)


def class_histogram(pred: Tensor, num_classes: int, min_fraction: float = 0.02
                    ) -> dict[str, object]:
    """Fraction of items per predicted class, and how many classes hold at least
    `min_fraction` of them (scattered misclassified garbage does not count as a class)."""
    frac = torch.bincount(pred, minlength=num_classes)[:num_classes].double() / max(len(pred), 1)
    return {"class_fraction": [round(float(f), 4) for f in frac],
            "classes_present": int((frac >= min_fraction).sum())}
