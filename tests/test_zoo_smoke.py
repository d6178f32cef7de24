"""A few-step run of the zoo training script, so that it keeps working."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import qdiff
from qdiff.eval.digits_features import DigitsFeatureNet
from qdiff.models.zoo import digits

TINY_RUN = ["--feature-steps", "2", "--vae-steps", "3", "--unet-steps", "2",
            "--latent-copies", "1", "--no-accuracy-check"]


@pytest.fixture(scope="module")
def zoo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    digits.main(["--out", str(out), *TINY_RUN])
    return out


def test_few_step_run_writes_loadable_assets(zoo_out):
    features = zoo_out / "digits-features"
    net = DigitsFeatureNet.from_pretrained(features)
    stats = load_file(features / "reference_stats.safetensors")
    assert stats["mu"].shape == (net.config.widths[-1],)
    assert stats["sigma_s"].shape == (256, 256)  # 4 channels x 8 x 8

    teacher = zoo_out / "tiny-ldm-digits"
    assert not (zoo_out / "tiny-ldm-digits.partial").exists()
    pipe = qdiff.load_pipeline(teacher)
    images = pipe(class_labels=[0, 9], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 1) and np.isfinite(images).all()
    assert json.loads((teacher / "training.json").read_text())["unet_steps"] == 2


def test_finished_stages_are_not_retrained(zoo_out):
    stamps = [(zoo_out / d / "training.json").stat().st_mtime_ns
              for d in ("digits-features", "tiny-ldm-digits")]
    digits.main(["--out", str(zoo_out), *TINY_RUN])
    assert stamps == [(zoo_out / d / "training.json").stat().st_mtime_ns
                      for d in ("digits-features", "tiny-ldm-digits")]


def test_interrupted_teacher_build_reuses_its_trained_autoencoder(zoo_out, monkeypatch):
    partial = zoo_out / "tiny-ldm-digits.partial"
    (zoo_out / "tiny-ldm-digits").rename(partial)  # as if the UNet stage had crashed
    (partial / "training.json").unlink()
    vae_weights = (partial / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("the autoencoder was retrained")

    monkeypatch.setattr(digits, "train_vq_autoencoder", no_training)
    digits.main(["--out", str(zoo_out), *TINY_RUN])
    final = zoo_out / "tiny-ldm-digits"
    assert (final / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == vae_weights
    assert not partial.exists()
