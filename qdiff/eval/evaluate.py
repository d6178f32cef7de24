"""Score a set of samples against a reference: one feature pass, every requested metric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from qdiff.eval import metrics as M
from qdiff.eval.features import Features, extract_features
from qdiff.eval.frechet import MetricError
from qdiff.models.zoo.digits_data import load_digits_split


@dataclass
class Reference:
    """What samples are compared with: statistics, and features when images exist."""

    name: str
    stats: dict[str, np.ndarray]
    pool: Optional[torch.Tensor] = None  # per-sample pooled features (precision/recall)


def held_out_digits_reference(net: nn.Module, stats: dict[str, np.ndarray]) -> Reference:
    """The real held-out digits: their shipped statistics and per-image pooled features."""
    held_out = load_digits_split("held_out")
    pool = extract_features(net, (held_out.images + 1) / 2).pool
    return Reference("real held-out digits", stats, pool)


def reference_from_features(name: str, features: Features) -> Reference:
    return Reference(name=name, stats=M.reference_stats(features), pool=features.pool)


def check_metrics(requested: Sequence[str]) -> list[str]:
    """Lower-cased, de-duplicated metric names; an unknown one names the valid ones."""
    names = list(dict.fromkeys(name.strip().lower() for name in requested if name.strip()))
    unknown = [name for name in names if name not in M.METRICS]
    if unknown:
        raise MetricError(f"Unknown metric(s) {unknown}; choose from {list(M.METRICS)}.")
    return names


def score(features: Features, labels: Optional[torch.Tensor], reference: Reference,
          metrics: Sequence[str], class_logits: bool) -> dict[str, float]:
    """The requested metrics of `features` (and labels) against `reference`.

    `class_logits`: whether the feature network's logits are the pipeline's classes
    (true for the digits network), which class accuracy needs.
    """
    results: dict[str, float] = {}
    stats = M.reference_stats(features)
    if "fid" in metrics:
        results["fid"] = M.fid(stats, reference.stats)
    if "sfid" in metrics:
        results["sfid"] = M.sfid(stats, reference.stats)
    if "is" in metrics:
        results["is"], results["is_std"] = M.inception_score(features.logits)
    if "precision" in metrics or "recall" in metrics:
        if reference.pool is None:
            raise MetricError(f"precision/recall need reference images, and '{reference.name}' "
                             f"has only statistics; use a reference with images.")
        precision, recall = M.precision_recall(reference.pool, features.pool)
        results.update({k: v for k, v in (("precision", precision), ("recall", recall))
                        if k in metrics})
    if "accuracy" in metrics:
        if labels is None or not class_logits:
            raise MetricError("class accuracy needs labelled samples and a feature network "
                             "that classifies the pipeline's classes (--features digits).")
        results["accuracy"] = M.class_accuracy(features.logits, labels)
    return results
