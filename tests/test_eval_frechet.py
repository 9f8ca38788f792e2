"""Fréchet distance: identities, a direct float64 computation and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from eval_video.frechet import (
    SmallSampleWarning,
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    trace_sqrt_product,
)


def _gaussian(rng: np.random.Generator, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mix + shift


def test_identical_sets_give_zero() -> None:
    x = _gaussian(np.random.default_rng(0), 200, 16)
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)


def test_matches_direct_float64_computation() -> None:
    rng = np.random.default_rng(1)
    a, b = _gaussian(rng, 300, 24), _gaussian(rng, 250, 24, shift=0.3)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    direct = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance_features(a, b) == pytest.approx(direct, rel=1e-8)


def test_closed_form_for_commuting_covariances() -> None:
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d1, d2 = np.array([1.0, 2.0, 3.0, 0.5, 4.0, 1.5]), np.array([2.0, 2.0, 1.0, 0.5, 9.0, 0.1])
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    cov1, cov2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-10)


def test_trace_sqrt_of_non_commuting_matrices_matches_sqrtm() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    s1, s2 = a @ a.T, b @ b.T
    assert trace_sqrt_product(s1, s2) == pytest.approx(np.trace(scipy.linalg.sqrtm(s1 @ s2).real), rel=1e-9)


def test_covariance_is_np_cov_in_float64() -> None:
    x = np.random.default_rng(4).normal(size=(50, 5)).astype(np.float32)
    stats = feature_stats(x)
    assert stats.cov.dtype == np.float64
    np.testing.assert_allclose(stats.cov, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)


def test_small_sample_warns() -> None:
    x = np.random.default_rng(5).normal(size=(10, 32))
    with pytest.warns(SmallSampleWarning, match="N=10"):
        feature_stats(x)


def test_bad_features_are_errors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        feature_stats(np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        feature_stats(np.zeros((1, 3)))
