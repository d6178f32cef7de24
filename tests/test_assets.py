"""The embedded teacher and feature network that ship in assets/."""

from __future__ import annotations

import json

import numpy as np
import torch

from qdiff.eval.feature_nets import load_digits_reference_stats
from qdiff.eval.features import extract_features
from qdiff.eval.frechet import gaussian_stats
from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline
from qdiff.models.zoo.digits_data import load_digits_split

from conftest import ASSETS

# Mean pixel of each of 4 images (classes 0..3, seed 0, 20 DDIM steps, guidance 2), pinned
# when the assets were trained: retraining the teacher must update these on purpose.
PINNED_MEANS = [0.33182, 0.31046, 0.35965, 0.27796]


def test_assets_are_small_and_safetensors_only():
    files = [path for path in ASSETS.rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 30 * 2**20
    weights = [path for path in files if path.suffix in (".safetensors", ".bin", ".pt", ".pth",
                                                          ".ckpt", ".pkl")]
    assert weights and all(path.suffix == ".safetensors" for path in weights)


def test_teacher_is_the_ldm4_shape(teacher):
    assert isinstance(teacher, ClassConditionalLDMPipeline)
    assert type(teacher.vae).__name__ == "VQModel"
    assert type(teacher.scheduler).__name__ == "DDIMScheduler"
    assert teacher.unet.config.cross_attention_dim == teacher.class_embedder.config.embed_dim
    assert teacher.class_embedder.null_class == 10
    downsampling = 32 // teacher.unet.config.sample_size
    assert downsampling == 4 and teacher.unet.config.in_channels == 3


def _four_images(teacher, seed=0):
    return teacher(class_labels=[0, 1, 2, 3], guidance_scale=2.0, num_inference_steps=20,
                   generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_same_seed_same_images_and_pinned_values(teacher):
    first, again = _four_images(teacher), _four_images(teacher)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - _four_images(teacher, seed=1)).max() > 0.1
    means = first.reshape(4, -1).mean(1)
    np.testing.assert_allclose(means, PINNED_MEANS, atol=2e-3)


def test_pil_output_by_default(teacher):
    images = teacher(class_labels=[5], num_inference_steps=2).images
    assert images[0].size == (32, 32) and images[0].mode == "L"


def test_feature_net_classifies_held_out_digits(feature_net):
    held_out = load_digits_split("held_out")
    logits = extract_features(feature_net, (held_out.images + 1) / 2).logits
    assert (logits.argmax(1) == held_out.labels).float().mean() >= 0.97


def test_shipped_reference_stats_are_those_of_the_held_out_digits(feature_net):
    held_out = load_digits_split("held_out")
    features = extract_features(feature_net, (held_out.images + 1) / 2)
    stats = load_digits_reference_stats(ASSETS / "digits-features")
    mu, sigma = gaussian_stats(features.pool)
    mu_s, _ = gaussian_stats(features.spatial)
    np.testing.assert_allclose(stats["mu"], mu, atol=1e-4)
    np.testing.assert_allclose(stats["sigma"], sigma, atol=1e-4)
    np.testing.assert_allclose(stats["mu_s"], mu_s, atol=1e-4)


def test_teacher_draws_the_requested_digits(teacher, feature_net):
    labels = torch.arange(100) % 10
    images = teacher(class_labels=labels, guidance_scale=2.0, num_inference_steps=20,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images
    predicted = extract_features(feature_net, images).logits.argmax(1)
    assert (predicted == labels).float().mean() >= 0.9


def test_training_records_are_kept():
    record = json.loads((ASSETS / "tiny-ldm-digits" / "training.json").read_text())
    assert record["unet_steps"] > 1000 and record["vae_held_out_l1"] < 0.05
    features = json.loads((ASSETS / "digits-features" / "training.json").read_text())
    assert features["held_out_accuracy"] >= 0.97
