"""Video metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdiff.eval.digits_features import DigitsFeatureNet
from qdiff.eval.video_metrics import (centre_of_mass, consecutive_similarity, frame_accuracy,
                                      frame_fid, frame_images, mean_speed, motion,
                                      motion_error, video_metrics)

pytestmark = pytest.mark.usefixtures("one_thread")


def _blob_video(positions: list[tuple[int, int]], size: int = 16) -> torch.Tensor:
    """One video (1, F, 1, size, size): a 3x3 blob (brighter centre) at each (x, y)."""
    blob = torch.tensor([[0.2, 0.5, 0.2], [0.5, 1.0, 0.5], [0.2, 0.5, 0.2]])
    video = torch.zeros(1, len(positions), 1, size, size)
    for frame, (x, y) in enumerate(positions):
        video[0, frame, 0, y - 1:y + 2, x - 1:x + 2] = blob
    return video


def test_frame_images_are_upsampled_video_major():
    videos = torch.zeros(2, 3, 1, 16, 16)
    videos[1, 2] = 1.0  # the last frame of the second video is white
    images = frame_images(videos)
    assert images.shape == (6, 1, 32, 32)
    assert images[5].min() == 1.0 and images[:5].max() == 0.0


def test_frame_accuracy_counts_frames_against_their_videos_label():
    logits = torch.eye(10)[[0, 0, 1, 1, 2, 2]]  # predicted classes per frame
    assert frame_accuracy(logits, torch.tensor([0, 1, 2])) == 1.0
    assert frame_accuracy(logits, torch.tensor([1, 1, 2])) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="do not split"):
        frame_accuracy(logits, torch.tensor([0, 1, 2, 3]))


def test_consecutive_similarity_of_identical_frames_is_one():
    features = torch.randn(4, 5).repeat_interleave(3, dim=0)  # 4 still videos of 3 frames
    assert consecutive_similarity(features, 3) == pytest.approx(1.0, abs=1e-6)


def test_consecutive_similarity_by_hand():
    # frames [1,0] -> [0,1] -> [0,2]: cosines 0 and 1; second video constant: 1 and 1
    features = torch.tensor([[1.0, 0], [0, 1], [0, 2], [3, 4], [3, 4], [6, 8]])
    assert consecutive_similarity(features, 3) == pytest.approx((0 + 1 + 1 + 1) / 4)


def test_centre_of_mass_of_a_pixel_and_of_a_shifted_blob():
    single = torch.zeros(1, 1, 1, 16, 16)
    single[0, 0, 0, 5, 3] = 0.7  # row y=5, column x=3
    torch.testing.assert_close(centre_of_mass(single), torch.tensor([[[3.0, 5.0]]]))
    video = _blob_video([(4, 6)])
    shifted = torch.roll(video, shifts=(-1, 2), dims=(-2, -1))  # y - 1, x + 2
    moved = centre_of_mass(shifted) - centre_of_mass(video)
    torch.testing.assert_close(moved, torch.tensor([[[2.0, -1.0]]]))


def test_centre_of_mass_weights_by_intensity():
    frame = torch.zeros(1, 1, 1, 4, 4)
    frame[..., 0, 0], frame[..., 0, 3] = 1.0, 3.0  # x = (0 * 1 + 3 * 3) / 4
    torch.testing.assert_close(centre_of_mass(frame), torch.tensor([[[2.25, 0.0]]]))


def test_motion_error_is_paired_motion_not_position():
    moving = _blob_video([(4 + f, 8) for f in range(4)])  # +1 pixel per frame in x
    same_motion_elsewhere = _blob_video([(3 + f, 5) for f in range(4)])
    still = _blob_video([(6, 8)] * 4)
    torch.testing.assert_close(motion(centre_of_mass(moving)),
                               torch.tensor([[[1.0, 0.0]] * 3]))
    assert motion_error(moving, moving) == 0.0
    assert motion_error(moving, same_motion_elsewhere) == pytest.approx(0.0, abs=1e-5)
    assert motion_error(moving, still) == pytest.approx(1.0, abs=1e-5)
    diagonal = _blob_video([(4 + 3 * f, 4 + 4 * f) for f in range(3)])  # 5 px per frame
    assert mean_speed(diagonal) == pytest.approx(5.0, abs=1e-5)
    assert mean_speed(still) == 0.0
    with pytest.raises(ValueError, match="pair up"):
        motion_error(moving, still[:, :3])


def test_frame_fid_by_hand():
    features = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    assert frame_fid(features, features) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, -2.0, 0.5])  # same covariance: FID = |shift|^2
    assert frame_fid(features + shift, features) == pytest.approx(5.25, abs=1e-6)


def test_video_metrics_of_a_video_against_itself():
    torch.manual_seed(0)
    net = DigitsFeatureNet(widths=(4, 8, 8)).eval()  # 8 pooled features, 16 frames
    videos = torch.cat([_blob_video([(4 + f, 8) for f in range(8)]),
                        _blob_video([(8, 12 - f) for f in range(8)])])
    results = video_metrics(net, videos, torch.tensor([3, 4]), reference=videos)
    assert set(results) == {"frame_accuracy", "consecutive_similarity", "mean_speed",
                            "frame_fid", "motion_error"}
    assert results["motion_error"] == 0.0 and results["mean_speed"] == pytest.approx(1.0)
    assert abs(results["frame_fid"]) < 1e-4
    assert 0.0 <= results["frame_accuracy"] <= 1.0
    assert np.isfinite(results["consecutive_similarity"])
    assert "frame_fid" not in video_metrics(net, videos, torch.tensor([3, 4]))
