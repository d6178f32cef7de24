"""Short clips of one moving digit: the embedded video domain of qdiff.

A clip is one of scikit-learn's digits (from the train or held-out split of
`digits_data`, so the video teacher never sees a held-out digit), drawn at 3/4 of the
frame and sliding with a constant velocity, bouncing off the borders of the area its
centre may reach. Frames are rendered at 32x32 with sub-pixel positions (bilinear), then
averaged down to 16x16: a clip is (8, 1, 16, 16) in [-1, 1]. At this size and range of
motion the digits feature network still classifies the real frames (upsampled to 32x32)
as well as it classifies the still digits (tests/test_moving_digits.py).

Everything is drawn from a torch.Generator, so a seed gives the same clips everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qdiff.models.zoo.digits_data import IMAGE_SIZE, DigitsSplit, load_digits_split, random_affine

NUM_FRAMES = 8
FRAME_SIZE = 16
DIGIT_SCALE = 0.75  # the digit's 32x32 image drawn at 24x24
MAX_OFFSET = 4.0  # pixels at 32x32: how far the digit's centre may move from the frame's
SPEED_RANGE = (1.0, 2.0)  # pixels per frame at 32x32


@dataclass
class MovingDigits:
    clips: torch.Tensor  # (N, frames, 1, 16, 16), float32 in [-1, 1]
    labels: torch.Tensor  # (N,), int64 in 0..9
    offsets: torch.Tensor  # (N, frames, 2): the digit's (x, y) shift from the centre, pixels at 32x32


def bounce(start: torch.Tensor, velocity: torch.Tensor, num_frames: int,
           limit: float = MAX_OFFSET) -> torch.Tensor:
    """Positions (N, frames, 2) of points moving at constant `velocity` from `start`,
    reflected at -limit and +limit (a triangle wave of period 4 * limit)."""
    time = torch.arange(num_frames, dtype=torch.float32)[None, :, None]
    free = start[:, None, :] + velocity[:, None, :] * time + limit  # in [0, 2 limit] when inside
    folded = torch.remainder(free, 4 * limit)
    return torch.where(folded > 2 * limit, 4 * limit - folded, folded) - limit


def render(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Frames (N, frames, 1, 16, 16) of 32x32 digit `images` (N, 1, 32, 32) in [-1, 1],
    scaled by DIGIT_SCALE and shifted by `offsets` (N, frames, 2) pixels."""
    n, frames = offsets.shape[:2]
    shift = offsets.reshape(-1, 2) * 2 / IMAGE_SIZE  # pixels -> normalised coordinates
    theta = torch.zeros(n * frames, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / DIGIT_SCALE
    theta[:, :, 2] = -shift / DIGIT_SCALE
    source = images.repeat_interleave(frames, dim=0) + 1.0  # background 0 for zero padding
    grid = F.affine_grid(theta, [n * frames, 1, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    drawn = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    small = F.avg_pool2d(drawn, IMAGE_SIZE // FRAME_SIZE) - 1.0
    return small.reshape(n, frames, 1, FRAME_SIZE, FRAME_SIZE)


def random_motion(n: int, generator: torch.Generator,
                  num_frames: int = NUM_FRAMES) -> torch.Tensor:
    """Offsets (n, frames, 2): a uniform start in the allowed square, a uniform direction
    and a speed in SPEED_RANGE, bouncing off the square's sides."""
    start = (torch.rand(n, 2, generator=generator) * 2 - 1) * MAX_OFFSET
    angle = torch.rand(n, generator=generator) * 2 * math.pi
    low, high = SPEED_RANGE
    speed = low + (high - low) * torch.rand(n, generator=generator)
    velocity = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1) * speed[:, None]
    return bounce(start, velocity, num_frames)


def clips_of(digits: DigitsSplit, indices: torch.Tensor, generator: torch.Generator,
             augment: bool = False) -> MovingDigits:
    """One clip per digit `indices` of `digits`, each with its own random motion; with
    `augment`, each digit is first rotated and zoomed a little (no shift: the motion is exact)."""
    images = digits.images[indices]
    if augment:
        images = random_affine(images, generator, max_shift=0.0)
    offsets = random_motion(len(indices), generator)
    return MovingDigits(render(images, offsets), digits.labels[indices], offsets)


def load_moving_digits(split: str, copies: int = 1, seed: int = 0) -> MovingDigits:
    """Every digit of the "train" or "held_out" split, `copies` times, each with its own
    motion drawn from `seed`; no augmentation."""
    digits = load_digits_split(split)
    generator = torch.Generator().manual_seed(seed)
    indices = torch.arange(len(digits.labels)).repeat(copies)
    return clips_of(digits, indices, generator)
