"""The digits split and augmentation that every zoo model is trained on."""

from __future__ import annotations

import pytest
import torch

from qdiff.models.zoo.digits_data import load_digits_split, random_affine


def test_split_is_disjoint_stratified_and_in_range():
    train, held_out = load_digits_split("train"), load_digits_split("held_out")
    assert train.images.shape[1:] == (1, 32, 32)
    assert len(train.labels) + len(held_out.labels) == 1797
    assert len(held_out.labels) == 450
    assert train.images.min() >= -1.0 and train.images.max() <= 1.0
    flat_train = {tuple(image.flatten().tolist()) for image in train.images[:200]}
    assert not any(tuple(image.flatten().tolist()) in flat_train for image in held_out.images)
    held_counts = torch.bincount(held_out.labels, minlength=10).float()
    all_counts = held_counts + torch.bincount(train.labels, minlength=10)
    assert (held_counts - 0.25 * all_counts).abs().max() <= 1.0  # stratified: 25% of each class


def test_split_name_is_checked():
    with pytest.raises(ValueError, match="'train' or 'held_out'"):
        load_digits_split("test")


def test_affine_with_no_motion_is_identity_and_motion_changes_images():
    images = load_digits_split("held_out").images[:8]
    generator = torch.Generator().manual_seed(0)
    still = random_affine(images, generator, max_shift=0.0, max_rotation_deg=0.0,
                          scale_range=(1.0, 1.0))
    torch.testing.assert_close(still, images, atol=1e-5, rtol=0)
    moved = random_affine(images, generator)
    assert (moved - images).abs().mean() > 0.01
    assert moved.min() >= -1.0 - 1e-6 and moved.max() <= 1.0 + 1e-6
