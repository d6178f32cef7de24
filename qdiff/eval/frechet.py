"""Gaussian statistics of feature sets and the Frechet distance between them (FID, sFID)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

from qdiff.errors import QdiffError


class MetricError(QdiffError, ValueError):
    """A metric cannot be computed from what was given; the message says what to change."""


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of (N, D) features, in float64."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise MetricError(f"Expected (N, D) features with N >= 2, got shape {array.shape}.")
    return array.mean(axis=0), np.cov(array, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray,
                     mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), as in the FID paper and ADM's evaluator.

    When S1 S2 is singular (fewer samples than dimensions), a small multiple of the
    identity is added to both covariances, as pytorch-fid and ADM do.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricError(f"Statistics differ in shape: {mu1.shape} vs {mu2.shape}; the samples "
                          f"and the reference come from different feature networks: pass the "
                          f"--features the reference was computed with (inception for ADM's).")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
