"""PNG grids of teacher vs student samples from fixed seeds: what a person watches."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn
from torchvision.utils import save_image

from qdiff.distill.batches import mixed_seed
from qdiff.families import Family, family_for
from qdiff.walk import sample_with_students


def sample_generators(seed: int, count: int, start: int = 0) -> list[torch.Generator]:
    """One generator per sample j = start, ..., start + count - 1, seeded (seed, j): a
    sample's noise does not depend on the batch it is drawn in."""
    return [torch.Generator().manual_seed(mixed_seed(seed, j)) for j in range(start, start + count)]


@torch.no_grad()
def sample_images(family: Family, students: Optional[Mapping[str, nn.Module]],
                  ids: torch.Tensor, steps: int, guidance: float, seed: int = 0,
                  batch_size: Optional[int] = None) -> torch.Tensor:
    """Images (N, C, H, W) in [0, 1] the family's pipeline samples for condition `ids`, with
    the students in their denoisers' place (None: the teacher), `batch_size` at a time."""
    generators = sample_generators(seed, len(ids))
    size = batch_size or len(ids)
    images = []
    for start in range(0, len(ids), size):
        kwargs = family.call_kwargs(ids[start:start + size], generators[start:start + size],
                                    steps, guidance, output_type="pt")
        # through the tap also for the teacher: a bf16 denoiser among float32 components
        output = sample_with_students(family.pipe, students or {}, kwargs)
        images.append(family.to_images(output))
    return torch.cat(images)


def save_comparison_grid(pipe, students: Mapping[str, nn.Module], path: Path, steps: int,
                         guidance: float, seed: int = 0, per_class: int = 2,
                         batch_size: Optional[int] = None) -> Path:
    """Rows: teacher samples, then the students' from the same seeds (one column per
    condition of the family's preview: classes, or the first prompts).

    `batch_size` samples at a time: a run passes its training batch, so that the grid
    (20 images, and their decoding) does not set the run's peak memory."""
    family = family_for(pipe)
    conditions = family.preview_conditions()
    ids = conditions.repeat(per_class)
    rows = [sample_images(family, chosen, ids, steps, guidance, seed, batch_size)
            for chosen in (None, students)]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(rows), path, nrow=len(conditions), padding=1)
    return path
