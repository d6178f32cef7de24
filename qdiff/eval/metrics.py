"""Sample-quality metrics over features: FID, sFID, Inception Score, precision/recall, accuracy.

All take `Features` (or their parts) so that one feature pass serves every metric, with
the Inception network on natural images or the digits network on the embedded domain.
"""

from __future__ import annotations

import numpy as np
import torch

from qdiff.eval.features import Features
from qdiff.eval.frechet import frechet_distance, gaussian_stats

METRICS = ("fid", "sfid", "is", "precision", "recall", "accuracy")


def reference_stats(features: Features) -> dict[str, np.ndarray]:
    """Gaussian statistics under the names of ADM's reference batches."""
    mu, sigma = gaussian_stats(features.pool)
    mu_s, sigma_s = gaussian_stats(features.spatial)
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def fid(stats: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return frechet_distance(stats["mu"], stats["sigma"], reference["mu"], reference["sigma"])


def sfid(stats: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    return frechet_distance(stats["mu_s"], stats["sigma_s"],
                            reference["mu_s"], reference["sigma_s"])


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` chunks (Salimans et al.)."""
    probs = torch.softmax(logits.double(), dim=1)
    scores = []
    for chunk in probs.chunk(splits):
        marginal = chunk.mean(0, keepdim=True)
        kl = (chunk * (torch.log(chunk + 1e-12) - torch.log(marginal + 1e-12))).sum(1)
        scores.append(torch.exp(kl.mean()).item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    distances = torch.cdist(points, points)
    return distances.kthvalue(k + 1, dim=1).values  # k+1: the nearest is the point itself


def _covered(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each query lies in at least one ball (centre, radius)."""
    return (torch.cdist(queries, centres) <= radii[None, :]).any(dim=1)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) on k-NN manifolds.

    precision: share of generated samples inside the real manifold (fidelity);
    recall: share of real samples inside the generated manifold (coverage).
    """
    real, fake = real.double(), fake.double()
    precision = _covered(fake, real, _kth_neighbour_radii(real, k)).double().mean().item()
    recall = _covered(real, fake, _kth_neighbour_radii(fake, k)).double().mean().item()
    return precision, recall


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples that the feature network assigns to the class they were asked for."""
    return (logits.argmax(1) == labels).double().mean().item()
