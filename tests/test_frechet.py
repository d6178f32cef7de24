"""Frechet distance against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from qdiff.eval.frechet import frechet_distance, gaussian_stats


def test_distance_of_a_set_to_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 16))
    mu, sigma = gaussian_stats(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_diagonal_gaussians_match_the_closed_form():
    # For diagonal covariances: |mu1 - mu2|^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i)).
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)


def test_rotated_gaussians_match_the_closed_form():
    # Same covariance rotated: the trace term is Tr(S1 + S2 - 2 (S1 S2)^1/2), computed by eigh.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 4))
    sigma1 = a @ a.T + np.eye(4)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    sigma2 = q @ sigma1 @ q.T
    s1_half = _sqrt_psd(sigma1)
    expected = np.trace(sigma1 + sigma2 - 2 * _sqrt_psd(s1_half @ sigma2 @ s1_half))
    assert frechet_distance(np.zeros(4), sigma1, np.zeros(4), sigma2) == pytest.approx(expected)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_singular_covariances_stay_finite():
    features = np.random.default_rng(2).normal(size=(5, 20))  # fewer samples than dims
    mu, sigma = gaussian_stats(features)
    assert np.isfinite(frechet_distance(mu, sigma, mu + 1.0, sigma))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
