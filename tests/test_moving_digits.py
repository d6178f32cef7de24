"""The moving-digits clips: motion, rendering and determinism."""

from __future__ import annotations

import pytest
import torch

from qdiff.eval.features import extract_features
from qdiff.eval.video_metrics import centre_of_mass, frame_accuracy, frame_images
from qdiff.models.zoo.digits_data import load_digits_split
from qdiff.models.zoo.moving_digits import (FRAME_SIZE, MAX_OFFSET, NUM_FRAMES, SPEED_RANGE,
                                            bounce, clips_of, load_moving_digits, random_motion,
                                            render)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bounce_reflects_at_the_limits_by_hand():
    positions = bounce(torch.tensor([[3.0, -1.0]]), torch.tensor([[2.0, -1.5]]), 7, limit=4.0)
    torch.testing.assert_close(positions[0, :, 0], torch.tensor([3.0, 3, 1, -1, -3, -3, -1]))
    torch.testing.assert_close(positions[0, :, 1], torch.tensor([-1.0, -2.5, -4, -2.5, -1, 0.5, 2]))


def test_bounce_stays_inside_and_keeps_its_speed_between_reflections():
    generator = torch.Generator().manual_seed(0)
    start = (torch.rand(500, 2, generator=generator) * 2 - 1) * 4
    velocity = torch.randn(500, 2, generator=generator) * 5  # often several reflections
    positions = bounce(start, velocity, 40, limit=4.0)
    assert positions.abs().max() <= 4.0 + 1e-5
    steps = (positions[:, 1:] - positions[:, :-1]).abs()
    assert (steps <= velocity.abs()[:, None] + 1e-4).all()  # a reflection only shortens a step
    free = (positions[:, :-1].abs() + velocity.abs()[:, None] < 4.0 - 1e-3)  # no wall in reach
    torch.testing.assert_close(steps[free], velocity.abs()[:, None].expand_as(steps)[free],
                               atol=1e-4, rtol=0)


def test_random_motion_starts_inside_with_speeds_in_range():
    offsets = random_motion(300, torch.Generator().manual_seed(1))
    assert offsets.shape == (300, NUM_FRAMES, 2)
    assert offsets.abs().max() <= MAX_OFFSET + 1e-5
    first_step = (offsets[:, 1] - offsets[:, 0]).norm(dim=1)
    assert first_step.max() <= SPEED_RANGE[1] + 1e-5
    assert offsets[:, :, 0].std() > 1.0 and offsets[:, :, 1].std() > 1.0  # both directions


def test_same_seed_same_clips_other_seed_other_clips():
    digits = load_digits_split("train")
    indices = torch.arange(6)
    first = clips_of(digits, indices, torch.Generator().manual_seed(3), augment=True)
    again = clips_of(digits, indices, torch.Generator().manual_seed(3), augment=True)
    other = clips_of(digits, indices, torch.Generator().manual_seed(4), augment=True)
    assert first.clips.shape == (6, NUM_FRAMES, 1, FRAME_SIZE, FRAME_SIZE)
    assert torch.equal(first.clips, again.clips) and torch.equal(first.offsets, again.offsets)
    assert (first.clips - other.clips).abs().max() > 0.5
    assert torch.equal(first.labels, digits.labels[:6])
    assert first.clips.min() >= -1.0 and first.clips.max() <= 1.0


def test_rendered_digit_moves_by_its_offset():
    digits = load_digits_split("held_out")
    offsets = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [-2.0, 3.0], [1.0, -4.0]]]).repeat(8, 1, 1)
    frames = render(digits.images[:8], offsets)
    centres = centre_of_mass((frames + 1) / 2)
    moved = centres - centres[:, :1]
    torch.testing.assert_close(moved, offsets / 2, atol=0.12, rtol=0)  # 16x16 = half of 32x32


def test_still_digit_is_a_smaller_copy_of_the_digit():
    digits = load_digits_split("held_out")
    frames = render(digits.images[:4], torch.zeros(4, 1, 2))
    assert frames.shape == (4, 1, 1, FRAME_SIZE, FRAME_SIZE)
    ink = (frames + 1) / 2
    assert ink[..., :2, :].max() < 0.05 and ink[..., -2:, :].max() < 0.05  # margins stay dark
    assert ink.amax(dim=(-2, -1)).min() > 0.5


def test_feature_net_reads_moving_held_out_clips(feature_net):
    clips = load_moving_digits("held_out", seed=0)
    assert len(clips.labels) == len(load_digits_split("held_out").labels)
    subset = slice(0, 150)
    videos = (clips.clips[subset] + 1) / 2
    logits = extract_features(feature_net, frame_images(videos)).logits
    assert frame_accuracy(logits, clips.labels[subset]) >= 0.93
