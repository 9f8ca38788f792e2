"""The Fréchet distance between Gaussians fitted to two feature sets, in float64.

``d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``

Choices (stated in every report):

- **covariance normalization N-1** (unbiased, as ``np.cov`` and pytorch-fid). StyleGAN-V's
  ``compute_fvd`` and cd-fvd divide by N instead (0.4 % apart at N = 200, more at small N).
- **float64 throughout**; features are cast to float64 before the mean and covariance.
- **eigen-based trace square root**: with ``R = S1^(1/2)`` from a symmetric eigendecomposition,
  ``tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(R S2 R))`` because ``S1 S2`` is similar to the
  symmetric PSD matrix ``R S2 R``. Tiny negative eigenvalues from round-off are clipped to 0.
  No ``scipy.linalg.sqrtm`` (its ``disp`` argument is deprecated and it can return complex
  values on near-singular inputs).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

COVARIANCE_DDOF = 1
COVARIANCE_NOTE = "covariance normalized by N-1 (np.cov); float64; eigen-based trace sqrt"


class SmallSampleWarning(UserWarning):
    """The number of clips is small against the feature dimension, so FVD is biased upward."""


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set (float64) and the number of samples behind them."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self.mean.shape[0])


def small_sample_message(n: int, dim: int) -> str | None:
    """A warning text when ``n`` clips cannot give a full-rank covariance in ``dim`` dimensions."""
    if n <= dim:
        return (f"only N={n} clips for {dim}-d features: the covariance has rank <= {n - 1} < {dim}, "
                "so the Fréchet distance is biased upward and not comparable across N (2048 clips is the convention)")
    return None


def feature_stats(features: np.ndarray, ddof: int = COVARIANCE_DDOF, warn: bool = True) -> FeatureStats:
    """Fit mean and covariance (normalized by ``N - ddof``) to ``(N, D)`` features in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    n, dim = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain NaN or infinite values; check the inputs and the backbone weights")
    message = small_sample_message(n, dim)
    if warn and message:
        warnings.warn(message, SmallSampleWarning, stacklevel=2)
    mean = x.mean(axis=0)
    centered = x - mean
    cov = centered.T @ centered / (n - ddof)
    return FeatureStats(mean, cov, n)


def _sym_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """``tr((cov1 cov2)^(1/2))`` for symmetric PSD matrices, via eigendecompositions in float64."""
    c1, c2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root = _sym_sqrt(c1)
    middle = root @ c2 @ root
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), float64, clipped at 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {cov1.shape} vs {cov2.shape}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2))
    return max(value, 0.0)


def frechet_distance_stats(a: FeatureStats, b: FeatureStats) -> float:
    """:func:`frechet_distance` of two fitted :class:`FeatureStats`."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def frechet_distance_features(a: np.ndarray, b: np.ndarray, ddof: int = COVARIANCE_DDOF) -> float:
    """Fréchet distance between Gaussians fitted to two ``(N, D)`` feature sets."""
    return frechet_distance_stats(feature_stats(a, ddof), feature_stats(b, ddof))
