"""Sample-quality maths against closed forms (Gaussians, one-hot classifiers, k-NN counting)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scoretk.evaluation.metrics import (GaussianStats, frechet_distance, gaussian_stats,
                                        inception_score, kernel_distance, knn_radii,
                                        manifold_metrics)


def stats(mu, sigma) -> GaussianStats:
    return GaussianStats(np.asarray(mu, np.float64), np.asarray(sigma, np.float64), 10**6)


def rotation(theta: float) -> np.ndarray:
    return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def test_frechet_distance_of_gaussians_with_commuting_covariances():
    # diagonal covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([3.0, -1.0, 2.0])
    expected = 13.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(stats(m1, np.diag(a)), stats(m2, np.diag(b))) == pytest.approx(
        expected, rel=1e-10)


def test_frechet_distance_of_gaussians_with_non_commuting_covariances():
    # 2-D: Tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 (eigenvalues >= 0)
    s1 = np.diag([4.0, 1.0])
    r = rotation(0.7)
    s2 = r @ np.diag([2.0, 0.5]) @ r.T
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    expected = 1.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    got = frechet_distance(stats([0.0, 0.0], s1), stats([1.0, 0.0], s2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(stats([0.0, 0.0], s1), stats([0.0, 0.0], s1)) == pytest.approx(
        0.0, abs=1e-12)


def test_frechet_distance_from_samples_approaches_the_closed_form():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 1.0])
    y = torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0])
    expected = 1.0 + (2 - 1) ** 2  # |dm|^2 + (sqrt 4 - sqrt 1)^2
    # estimation error: ~2 |dm| / sqrt(n) from the means plus O(1/sqrt n) from the covariances
    assert frechet_distance(gaussian_stats(x), gaussian_stats(y)) == pytest.approx(
        expected, abs=0.03)


def test_gaussian_stats_match_numpy_in_chunks():
    x = torch.randn(3000, 5, generator=torch.Generator().manual_seed(1)) * 3 + 7
    s = gaussian_stats(x)
    assert np.allclose(s.mu, x.double().mean(0).numpy(), rtol=0, atol=1e-12)
    assert np.allclose(s.sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-12, atol=0)
    assert s.n == 3000


def kid_1d(mu: float) -> float:
    """Population MMD^2 of N(0, 1) and N(mu, 1) under k(x, y) = (x y + 1)^3, whose feature map
    is (x^3, sqrt3 x^2, sqrt3 x, 1): differences of the first three moments."""
    return (mu ** 3 + 3 * mu) ** 2 + 3 * (mu ** 2) ** 2 + 3 * mu ** 2


def test_kid_matches_the_polynomial_kernel_mmd_of_two_gaussians():
    g = torch.Generator().manual_seed(0)
    n = 20_000
    x = torch.randn(n, 1, generator=g)
    y = torch.randn(n, 1, generator=g) + 0.5
    mean, std = kernel_distance(y, x, subsets=30)
    # error ~2.5% from the sets' third moments (2 * 1.6 * sqrt(15 / n)), ~2% from 30 subsets
    assert mean == pytest.approx(kid_1d(0.5), rel=0.1)
    assert std > 0


def test_kid_of_a_set_with_itself_is_about_zero():
    g = torch.Generator().manual_seed(0)
    x, x2 = torch.randn(2, 2000, 16, generator=g)
    shifted, _ = kernel_distance(x + 0.5, x, subsets=20, subset_size=500)
    # two draws of one distribution: the unbiased estimate scatters around zero
    mean, std = kernel_distance(x2, x, subsets=20, subset_size=500)
    assert abs(mean) < 3 * std and abs(mean) < 0.01 * shifted
    # one set against itself: independent subsets share items, whose k(x, x) enters the
    # cross term only, so the estimate is slightly negative; still ~0 on the shift's scale
    same, _ = kernel_distance(x, x, subsets=20, subset_size=500)
    assert abs(same) < 0.01 * shifted


def test_kid_subset_size_shrinks_to_small_sets():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    mean, _ = kernel_distance(x, x + 3)
    assert mean > 0


def test_inception_score_closed_forms():
    classes = 7
    labels = torch.arange(700) % classes
    confident = 60.0 * torch.nn.functional.one_hot(labels, classes).double()
    # every sample certain of its class, classes balanced: exp(H(y)) = number of classes
    assert inception_score(confident, splits=1)[0] == pytest.approx(classes, rel=1e-9)
    # every sample the same distribution: KL = 0, score 1
    same = torch.randn(1, classes, dtype=torch.float64).expand(700, -1)
    mean, std = inception_score(same)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_manifold_metrics_of_a_set_against_itself():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # radii a hair larger, so that the k-th neighbour on each ball's edge counts however the
    # distance from the other side rounds (cdist's matrix-product form is not symmetric)
    m = manifold_metrics(x, x, real_radii=knn_radii(x, 3) * (1 + 1e-9))
    assert m["precision"] == m["recall"] == m["coverage"] == 1.0
    # each ball holds its centre and its k neighbours: density = (k + 1) / k
    assert m["density"] == pytest.approx(4 / 3, abs=1e-12)


def test_manifold_metrics_detect_mode_dropping():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) + 10])
    half = torch.randn(300, 2, generator=g)  # only the first mode
    m = manifold_metrics(half, real)
    assert m["precision"] > 0.9 and 0.4 < m["recall"] < 0.6 and 0.4 < m["coverage"] < 0.6


def test_precision_recall_agree_with_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(0)
    real = torch.randn(700, 8, generator=g, dtype=torch.float64)
    fake = 1.3 * torch.randn(600, 8, generator=g, dtype=torch.float64) + 0.2
    ref = prc_features_to_metric(fake, real, prc_neighborhood=3, prc_batch_size=10000,
                                 save_cpu_ram=False, verbose=False)
    m = manifold_metrics(fake, real, real_radii=knn_radii(real, 3))
    # same counts (steps of 1/600, 1/700); torch-fidelity averages in float32
    assert m["precision"] == pytest.approx(ref["precision"], rel=1e-6)
    assert m["recall"] == pytest.approx(ref["recall"], rel=1e-6)
