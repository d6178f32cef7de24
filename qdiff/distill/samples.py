"""PNG grids of teacher vs student samples from fixed seeds: what a person watches."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.utils import save_image


@torch.no_grad()
def save_comparison_grid(pipe, student: nn.Module, path: Path, steps: int, guidance: float,
                         seed: int = 0, per_class: int = 2) -> Path:
    """Rows: teacher samples, then the student's from the same seeds (one column per class)."""
    num_classes = pipe.class_embedder.null_class
    labels = torch.arange(num_classes).repeat(per_class)
    rows = []
    for denoiser in (pipe.unet, student):
        view = type(pipe)(**{**pipe.components, "unet": denoiser})
        view.set_progress_bar_config(disable=True)
        rows.append(view(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(seed), output_type="pt").images)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(rows), path, nrow=num_classes, padding=1)
    return path
