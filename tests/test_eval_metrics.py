"""Metrics against closed forms and against torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from qdiff.eval import metrics as M
from qdiff.eval.evaluate import Reference, check_metrics, reference_from_features, score
from qdiff.eval.features import Features


def _features(n: int, dim: int = 8, shift: float = 0.0, seed: int = 0) -> Features:
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(n, dim, generator=generator) + shift
    spatial = torch.randn(n, 2 * dim, generator=generator) + shift
    logits = torch.randn(n, 10, generator=generator)
    return Features(pool=pool, spatial=spatial, logits=logits)


def test_fid_and_sfid_of_a_set_against_itself_are_zero():
    features = _features(400)
    reference = reference_from_features("self", features)
    results = score(features, None, reference, ["fid", "sfid"], class_logits=False)
    assert results["fid"] == pytest.approx(0.0, abs=1e-7)
    assert results["sfid"] == pytest.approx(0.0, abs=1e-7)


def test_fid_of_gaussians_with_known_moments_matches_the_closed_form():
    # Exact moments by construction: whiten the sample, then impose mean and covariance.
    rng = np.random.default_rng(0)

    def with_moments(mean, cov, n=2000):
        x = rng.normal(size=(n, len(mean)))
        x = (x - x.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T
        return torch.from_numpy(x @ np.linalg.cholesky(cov).T + mean)

    mean1, mean2 = np.array([0.0, 0.0]), np.array([3.0, -1.0])
    var1, var2 = np.array([1.0, 4.0]), np.array([4.0, 1.0])
    a = with_moments(mean1, np.diag(var1))
    b = with_moments(mean2, np.diag(var2))
    expected = 10.0 + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))  # |dmu|^2 = 9 + 1
    stats_a = M.reference_stats(Features(a, a, a))
    stats_b = M.reference_stats(Features(b, b, b))
    assert M.fid(stats_a, stats_b) == pytest.approx(expected, rel=1e-6)
    assert M.sfid(stats_a, stats_b) == pytest.approx(expected, rel=1e-6)


class _PassThrough(nn.Module):
    """Hands torchmetrics our features as if they were the network's output."""

    def forward(self, x):
        return x.float() if x.dim() == 2 else x.flatten(1)[:, :6].float()


def test_fid_agrees_with_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _features(300, dim=6, seed=1).pool, _features(300, dim=6, shift=0.5, seed=2).pool
    metric = FrechetInceptionDistance(feature=_PassThrough())
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    ours = M.fid(M.reference_stats(Features(fake, fake, fake)),
                 M.reference_stats(Features(real, real, real)))
    assert ours == pytest.approx(metric.compute().item(), rel=1e-4)


def test_inception_score_closed_forms():
    confident = torch.eye(10).repeat(10, 1) * 50.0  # each sample sure of its own class, uniform marginal
    assert M.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-4)
    collapsed = torch.zeros(100, 10)
    collapsed[:, 3] = 50.0  # every sample the same class: KL to the marginal is 0
    assert M.inception_score(collapsed, splits=1)[0] == pytest.approx(1.0, abs=1e-6)
    uniform = torch.zeros(100, 10)
    assert M.inception_score(uniform, splits=4) == pytest.approx((1.0, 0.0), abs=1e-9)


def test_precision_recall_on_manifolds_of_known_overlap():
    real = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    same = torch.randn(500, 4, generator=torch.Generator().manual_seed(1))
    far = same + 100.0
    narrow = real[:50] * 0.01  # inside the real manifold but covering little of it
    assert M.precision_recall(real, same) > (0.8, 0.8)
    assert M.precision_recall(real, far) == (0.0, 0.0)
    precision, recall = M.precision_recall(real, narrow)
    assert precision == 1.0 and recall < 0.2


def test_class_accuracy_and_metric_name_checks():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    assert M.class_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert check_metrics(["FID", "sfid", "fid", " is "]) == ["fid", "sfid", "is"]
    with pytest.raises(ValueError, match=r"Unknown metric\(s\) \['kid'\]"):
        check_metrics(["fid", "kid"])


def test_metrics_that_need_more_say_what():
    features = _features(50)
    stats_only = Reference("stats.npz", M.reference_stats(features), pool=None)
    with pytest.raises(ValueError, match="precision/recall need reference images"):
        score(features, None, stats_only, ["precision"], class_logits=True)
    with pytest.raises(ValueError, match="class accuracy needs labelled samples"):
        score(features, None, stats_only, ["accuracy"], class_logits=True)
    assert math.isfinite(score(features, None, stats_only, ["is"], class_logits=False)["is"])
