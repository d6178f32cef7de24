"""The embedded video teacher that ships in assets/tiny-wan-digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qdiff.eval.video_metrics import video_metrics
from qdiff.models.class_video_pipeline import ClassConditionalVideoPipeline

from conftest import ASSETS

VIDEO_TEACHER = ASSETS / "tiny-wan-digits"
# Mean pixel of each of 4 videos (classes 0..3, seed 0, the pipeline's defaults: 20 Euler
# steps, guidance 4.5), pinned when the teacher was trained: retraining must update these.
PINNED_MEANS = [0.28906, 0.16514, 0.18334, 0.17545]


@pytest.fixture(scope="module")
def video_teacher():
    import qdiff

    pipe = qdiff.load_pipeline(VIDEO_TEACHER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _four_videos(pipe, seed=0):
    return pipe(class_labels=[0, 1, 2, 3], generator=torch.Generator().manual_seed(seed)).frames


def test_video_teacher_is_a_wan_transformer_with_a_class_embedding(video_teacher):
    assert isinstance(video_teacher, ClassConditionalVideoPipeline)
    assert type(video_teacher.transformer).__name__ == "WanTransformer3DModel"
    assert type(video_teacher.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert video_teacher.class_embedder.null_class == 10
    assert video_teacher.transformer.config.text_dim == video_teacher.class_embedder.config.embed_dim


def test_same_seed_same_video_and_pinned_values(video_teacher):
    first, again = _four_videos(video_teacher), _four_videos(video_teacher)
    assert first.shape == (4, 8, 16, 16, 1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - _four_videos(video_teacher, seed=1)).max() > 0.1
    np.testing.assert_allclose(first.reshape(4, -1).mean(1), PINNED_MEANS, atol=2e-3)


def test_video_teacher_draws_moving_digits_of_the_requested_class(video_teacher, feature_net):
    labels = torch.arange(40) % 10
    videos = video_teacher(class_labels=labels, generator=torch.Generator().manual_seed(0),
                           output_type="pt").frames
    metrics = video_metrics(feature_net, videos, labels)
    recorded = json.loads((VIDEO_TEACHER / "training.json").read_text())
    assert recorded["frame_accuracy"] >= 0.9  # the training run's own check (200 videos)
    assert metrics["frame_accuracy"] >= 0.8
    assert 0.3 < metrics["mean_speed"] < 1.0  # pixels per frame: the digit moves, not jumps
