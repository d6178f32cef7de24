"""PNG grids of teacher vs student samples from fixed seeds: what a person watches."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torchvision.utils import save_image

from qdiff.families import family_for


@torch.no_grad()
def save_comparison_grid(pipe, student: nn.Module, path: Path, steps: int, guidance: float,
                         seed: int = 0, per_class: int = 2, batch_size: Optional[int] = None) -> Path:
    """Rows: teacher samples, then the student's from the same seeds (one column per
    condition of the family's preview: classes, or the first prompts).

    `batch_size` samples at a time: a run passes its training batch, so that the grid
    (20 images, and their decoding) does not set the run's peak memory."""
    family = family_for(pipe)
    conditions = family.preview_conditions()
    rows = []
    for denoiser in (family.denoiser, student):
        rows.append(family.sample_images(denoiser, conditions.repeat(per_class), guidance, steps,
                                         torch.Generator().manual_seed(seed), batch_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(rows), path, nrow=len(conditions), padding=1)
    return path
