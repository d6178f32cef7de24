"""What a feature network gives the metrics, and batched extraction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm


@dataclass
class Features:
    """The three views the ADM evaluator takes of a batch of images."""

    pool: torch.Tensor  # (N, D) globally pooled features -> FID, precision/recall
    spatial: torch.Tensor  # (N, D_s) a few channels of an intermediate map -> sFID
    logits: torch.Tensor  # (N, classes) -> Inception Score, class accuracy


@torch.no_grad()
def extract_features(net: nn.Module, images: torch.Tensor, batch_size: int = 250,
                     progress: bool = False) -> Features:
    """Features of `images` (N, C, H, W) in [0, 1], in eval mode, batch by batch."""
    net.eval()
    starts = range(0, len(images), batch_size)
    if progress:
        starts = tqdm(starts, desc=f"features of {len(images)}", unit="batch")
    parts = [net(images[start:start + batch_size].float()) for start in starts]
    return Features(*(torch.cat([getattr(part, name) for part in parts])
                      for name in ("pool", "spatial", "logits")))
