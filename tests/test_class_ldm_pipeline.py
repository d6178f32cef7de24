"""ClassConditionalLDMPipeline on the teacher's architecture with random weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qdiff
from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline


def _sample(pipe, seed, **kwargs):
    options = dict(class_labels=[1, 7], num_inference_steps=3, output_type="np",
                   generator=torch.Generator().manual_seed(seed))
    options.update(kwargs)
    return pipe(**options).images


def test_same_seed_same_images_other_seed_other_images(random_class_ldm_pipeline):
    pipe = random_class_ldm_pipeline
    first, again, other = _sample(pipe, 0), _sample(pipe, 0), _sample(pipe, 1)
    assert first.shape == (2, 32, 32, 1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_output_types_agree(random_class_ldm_pipeline):
    pipe = random_class_ldm_pipeline
    arrays = _sample(pipe, 0)
    tensors = _sample(pipe, 0, output_type="pt")
    pil = _sample(pipe, 0, output_type="pil")
    np.testing.assert_allclose(tensors.permute(0, 2, 3, 1).numpy(), arrays, atol=1e-6)
    assert pil[0].size == (32, 32)
    np.testing.assert_allclose(np.asarray(pil[1]) / 255.0, arrays[1, ..., 0], atol=1 / 255 + 1e-6)
    latents = _sample(pipe, 0, output_type="latent")  # what distillation walks: not decoded
    with torch.no_grad():
        torch.testing.assert_close(pipe.decode_latents(latents), tensors)
    with pytest.raises(ValueError, match="output_type"):
        _sample(pipe, 0, output_type="mp4")


def test_guidance_combines_conditional_and_null_predictions(random_class_ldm_pipeline):
    pipe = random_class_ldm_pipeline
    latents = torch.randn(2, 3, 8, 8)
    t = torch.tensor(500)
    labels = torch.tensor([1, 7])
    cond = pipe.guided_noise(latents, t, pipe.class_context(labels, 1.0), 1.0)
    null = pipe.guided_noise(latents, t, pipe.class_context(torch.tensor([10, 10]), 1.0), 1.0)
    guided = pipe.guided_noise(latents, t, pipe.class_context(labels, 4.0), 4.0)
    torch.testing.assert_close(guided, null + 4.0 * (cond - null), atol=1e-5, rtol=1e-5)


def test_round_trip_through_save_and_load_pipeline(random_class_ldm_pipeline, tmp_path):
    random_class_ldm_pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionalLDMPipeline"
    assert index["class_embedder"] == ["qdiff.models.class_embedder", "ClassEmbedder"]
    loaded = qdiff.load_pipeline(tmp_path)
    assert isinstance(loaded, ClassConditionalLDMPipeline)
    np.testing.assert_array_equal(_sample(loaded, 3), _sample(random_class_ldm_pipeline, 3))


def test_class_labels_out_of_range_are_rejected(random_class_ldm_pipeline):
    with pytest.raises(ValueError, match=r"class labels must lie in 0..9"):
        _sample(random_class_ldm_pipeline, 0, class_labels=[11])


def test_load_pipeline_errors_say_what_to_provide(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        qdiff.load_pipeline(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        qdiff.load_pipeline(tmp_path / "file.txt")
    with pytest.raises(FileNotFoundError, match="could not be loaded as a hub id"):
        qdiff.load_pipeline(tmp_path / "missing-folder")
