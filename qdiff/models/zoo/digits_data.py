"""scikit-learn's handwritten digits as 32x32 images: the embedded domain of qdiff.

The data set ships inside scikit-learn (1797 images of 8x8 pixels, 16 grey levels), so
every model of the zoo can be trained and evaluated with no download. Images are
upsampled to 32x32 with bicubic interpolation and scaled to [-1, 1]; a fixed stratified
split keeps a held-out set that no zoo model ever trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

IMAGE_SIZE = 32
NUM_CLASSES = 10
HELD_OUT_FRACTION = 0.25
SPLIT_SEED = 0


@dataclass
class DigitsSplit:
    images: torch.Tensor  # (N, 1, 32, 32), float32 in [-1, 1]
    labels: torch.Tensor  # (N,), int64 in 0..9


def _upsample(pixels_8x8: torch.Tensor) -> torch.Tensor:
    images = pixels_8x8.reshape(-1, 1, 8, 8) / 16.0
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bicubic", align_corners=False)
    return images.clamp(0.0, 1.0) * 2.0 - 1.0


def load_digits_split(split: str) -> DigitsSplit:
    """The "train" or "held_out" part of the digits, at 32x32 in [-1, 1]."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got '{split}'.")
    data = load_digits()
    train_idx, held_idx = train_test_split(
        range(len(data.target)), test_size=HELD_OUT_FRACTION,
        random_state=SPLIT_SEED, stratify=data.target,
    )
    indices = torch.tensor(train_idx if split == "train" else held_idx)
    pixels = torch.as_tensor(data.data, dtype=torch.float32)[indices]
    labels = torch.as_tensor(data.target, dtype=torch.int64)[indices]
    return DigitsSplit(images=_upsample(pixels), labels=labels)


def random_affine(images: torch.Tensor, generator: torch.Generator,
                  max_shift: float = 0.08, max_rotation_deg: float = 10.0,
                  scale_range: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """Small random shifts, rotations and zooms: more digits from the same 1347.

    Background is -1 (black), so padding with -1 keeps augmented images in-domain.
    """
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * max_rotation_deg * torch.pi / 180
    scale = torch.empty(n).uniform_(*scale_range, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    shifted = F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    return shifted - 1.0
