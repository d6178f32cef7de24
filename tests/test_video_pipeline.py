"""ClassConditionalVideoPipeline on the video teacher's architecture with random weights,
and a few-step run of the video zoo script."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import qdiff
from qdiff.models.class_embedder import ClassEmbedder
from qdiff.models.class_video_pipeline import ClassConditionalVideoPipeline
from qdiff.models.zoo import video_digits
from qdiff.models.zoo.train_video_denoiser import (CONTEXT_DIM, build_flow_scheduler,
                                                   build_video_transformer, warmup_cosine)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    pipeline = ClassConditionalVideoPipeline(
        transformer=build_video_transformer().eval(),
        class_embedder=ClassEmbedder(10, CONTEXT_DIM).eval(), scheduler=build_flow_scheduler(),
        num_frames=4, height=8, width=8)  # small videos keep the tests fast
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _sample(pipe, seed, **kwargs):
    options = dict(class_labels=[1, 7], num_inference_steps=3, output_type="np",
                   generator=torch.Generator().manual_seed(seed))
    options.update(kwargs)
    return pipe(**options).frames


def test_same_seed_same_videos_other_seed_other_videos(pipe):
    first, again, other = _sample(pipe, 0), _sample(pipe, 0), _sample(pipe, 1)
    assert first.shape == (2, 4, 8, 8, 1)  # (N, F, H, W, C) as diffusers' video pipelines
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_output_types_agree(pipe):
    arrays = _sample(pipe, 0)
    tensors = _sample(pipe, 0, output_type="pt")
    pil = _sample(pipe, 0, output_type="pil")
    assert tensors.shape == (2, 4, 1, 8, 8)
    np.testing.assert_allclose(tensors.permute(0, 1, 3, 4, 2).numpy(), arrays, atol=1e-6)
    assert len(pil) == 2 and len(pil[1]) == 4 and isinstance(pil[1][3], Image.Image)
    np.testing.assert_allclose(np.asarray(pil[1][3]) / 255.0, arrays[1, 3, ..., 0],
                               atol=1 / 255 + 1e-6)
    latents = _sample(pipe, 0, output_type="latent")  # what distillation walks: not decoded
    torch.testing.assert_close(pipe.frames(latents), tensors)
    with pytest.raises(ValueError, match="output_type"):
        _sample(pipe, 0, output_type="mp4")


def test_guidance_doubles_the_batch_with_the_null_class(pipe):
    labels = torch.tensor([1, 7])
    assert pipe.class_context(labels, 1.0).shape == (2, 1, CONTEXT_DIM)
    context = pipe.class_context(labels, 3.0)
    assert context.shape == (4, 1, CONTEXT_DIM)
    torch.testing.assert_close(context[2:], pipe.class_embedder(torch.tensor([10, 10])))
    batches = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(len(args[0])), with_kwargs=True)
    try:
        _sample(pipe, 0, guidance_scale=3.0, num_inference_steps=2)
        _sample(pipe, 0, guidance_scale=1.0, num_inference_steps=2)
    finally:
        hook.remove()
    assert batches == [4, 4, 2, 2]


def test_guidance_combines_conditional_and_null_velocities(pipe):
    latents = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500.0)
    labels = torch.tensor([1, 7])
    cond = pipe.guided_velocity(latents, t, pipe.class_context(labels, 1.0), 1.0)
    null = pipe.guided_velocity(latents, t, pipe.class_context(torch.tensor([10, 10]), 1.0), 1.0)
    guided = pipe.guided_velocity(latents, t, pipe.class_context(labels, 4.0), 4.0)
    torch.testing.assert_close(guided, null + 4.0 * (cond - null), atol=1e-5, rtol=1e-5)


def test_euler_steps_integrate_the_velocity_from_noise_to_data(pipe, monkeypatch):
    """With the exact rectified-flow velocity noise - x0, any number of steps lands on x0."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 1, 4, 8, 8, generator=generator)
    target = torch.rand(2, 1, 4, 8, 8, generator=generator) * 1.6 - 0.8
    monkeypatch.setattr(pipe, "guided_velocity", lambda latents, *args: noise - target)
    frames = pipe(class_labels=[0, 1], num_inference_steps=5, latents=noise.clone(),
                  output_type="pt").frames
    torch.testing.assert_close(frames, (target.transpose(1, 2) + 1) / 2, atol=1e-5, rtol=0)


def test_latents_of_the_wrong_shape_are_rejected(pipe):
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(class_labels=[0], num_inference_steps=1, latents=torch.randn(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"class labels must lie in 0..9"):
        _sample(pipe, 0, class_labels=[11])


def test_round_trip_through_save_and_load_pipeline(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "ClassConditionalVideoPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["num_frames"] == 4 and index["height"] == 8
    assert not list(tmp_path.rglob("*.bin"))
    loaded = qdiff.load_pipeline(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, ClassConditionalVideoPipeline)
    np.testing.assert_array_equal(_sample(loaded, 3, guidance_scale=2.5),
                                  _sample(pipe, 3, guidance_scale=2.5))


def test_warmup_cosine_schedule_by_hand():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, steps=20, warmup_fraction=0.1)  # 2 warm-up steps
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert rates[11] == pytest.approx(0.5 * (1 + np.cos(np.pi * 9 / 18)))
    assert all(a >= b for a, b in zip(rates[2:], rates[3:]))


def test_few_step_zoo_run_writes_a_loadable_teacher_and_strip(tmp_path):
    out, strip = tmp_path / "assets", tmp_path / "strip.png"
    args = ["--out", str(out), "--steps", "2", "--batch-size", "2", "--check-videos", "0",
            "--strip", str(strip)]
    video_digits.main(args)
    teacher = out / video_digits.TEACHER_DIR
    assert not (out / f"{video_digits.TEACHER_DIR}.partial").exists()
    assert json.loads((teacher / "training.json").read_text())["steps"] == 2
    loaded = qdiff.load_pipeline(teacher)
    assert (loaded.config.num_frames, loaded.config.height) == (8, 16)
    with Image.open(strip) as image:  # 4 videos of 8 frames of 18x18 (a border), 4x larger
        assert image.size == (8 * 18 * 4, 4 * 18 * 4)
    stamp = (teacher / "training.json").stat().st_mtime_ns
    video_digits.main(args)  # a finished teacher is kept
    assert (teacher / "training.json").stat().st_mtime_ns == stamp
