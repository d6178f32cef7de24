"""Classifier-free guidance: the one formula the pipelines and the distillation loop share."""

from __future__ import annotations

import torch


def combine_branches(branches: torch.Tensor, guidance: float) -> torch.Tensor:
    """eps_u + s (eps_c - eps_u) of a batch holding the conditional predictions, then the null
    ones (`branches`, in whatever dtype they come); unguided (`guidance` <= 1), the batch
    is the conditional predictions alone and comes back as it is."""
    if guidance <= 1.0:
        return branches
    cond, uncond = branches.chunk(2)
    return uncond + guidance * (cond - uncond)
