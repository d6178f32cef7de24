"""Video metrics on the embedded domain: every frame is an image for the digits network.

Videos are (N, F, C, H, W) in [0, 1], as the video pipelines return them with
output_type="pt". The digits feature network sees 32x32 images, so the 16x16 frames of the
moving-digits teacher are upsampled (bicubic, as the digits themselves were) first.

    per frame  : class accuracy, features -> per-frame FID (`qdiff.eval.frechet`)
    over time  : cosine similarity of consecutive frames' features (1 for a still video),
                 the digit's centre-of-mass trajectory and the error of its frame-to-frame
                 motion against reference videos of the same seeds (paired)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from qdiff.eval.features import Features, extract_features
from qdiff.eval.frechet import frechet_distance, gaussian_stats

FEATURE_SIZE = 32  # the digits network's input size


def frame_images(videos: torch.Tensor) -> torch.Tensor:
    """All frames of `videos` (N, F, C, H, W) as images (N * F, C, 32, 32) in [0, 1]."""
    frames = videos.flatten(0, 1).float()
    if frames.shape[-1] != FEATURE_SIZE or frames.shape[-2] != FEATURE_SIZE:
        frames = F.interpolate(frames, size=FEATURE_SIZE, mode="bicubic", align_corners=False)
    return frames.clamp(0, 1)


def frame_features(net: nn.Module, videos: torch.Tensor) -> Features:
    """Features of every frame, in the order of `frame_images` (video-major)."""
    return extract_features(net, frame_images(videos))


def frame_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of frames classified as their video's label; `logits` is (N * F, classes)."""
    if len(logits) % len(labels):
        raise ValueError(f"{len(logits)} frames do not split into {len(labels)} videos.")
    frames_per_video = len(logits) // len(labels)
    expected = labels.to(logits.device).repeat_interleave(frames_per_video)
    return (logits.argmax(1) == expected).float().mean().item()


def frame_fid(pool: torch.Tensor, reference_pool: torch.Tensor) -> float:
    """Per-frame FID: the Frechet distance between two sets of frames' pooled features,
    every frame counted as one image (`pool` is (N * F, D), as `frame_features` gives)."""
    return frechet_distance(*gaussian_stats(pool), *gaussian_stats(reference_pool))


def consecutive_similarity(features: torch.Tensor, num_frames: int) -> float:
    """Mean cosine similarity of the features (N * F, D) of frames f and f + 1 of each
    video: 1 when nothing changes, lower for flicker or a digit that changes shape."""
    per_video = features.float().reshape(-1, num_frames, features.shape[-1])
    return F.cosine_similarity(per_video[:, 1:], per_video[:, :-1], dim=-1).mean().item()


def centre_of_mass(videos: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The intensity-weighted centre (x, y) of every frame, (N, F, 2) in pixels of the frame
    (pixel (0, 0) at the top left; background 0 does not count). Channels are summed."""
    mass = videos.float().sum(dim=2).clamp_min(0)  # (N, F, H, W)
    height, width = mass.shape[-2:]
    ys = torch.arange(height, dtype=mass.dtype, device=mass.device)
    xs = torch.arange(width, dtype=mass.dtype, device=mass.device)
    total = mass.sum(dim=(-2, -1)) + eps
    x = (mass.sum(dim=-2) * xs).sum(-1) / total
    y = (mass.sum(dim=-1) * ys).sum(-1) / total
    return torch.stack([x, y], dim=-1)


def motion(trajectory: torch.Tensor) -> torch.Tensor:
    """Frame-to-frame displacement (N, F - 1, 2) of a trajectory (N, F, 2)."""
    return trajectory[:, 1:] - trajectory[:, :-1]


def motion_error(videos: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean length (pixels) of the difference between the frame-to-frame motion of each
    video's centre of mass and that of the reference video of the same seed (paired)."""
    if videos.shape != reference.shape:
        raise ValueError(f"videos {tuple(videos.shape)} and reference "
                         f"{tuple(reference.shape)} must pair up one to one.")
    error = motion(centre_of_mass(videos)) - motion(centre_of_mass(reference))
    return error.norm(dim=-1).mean().item()


def mean_speed(videos: torch.Tensor) -> float:
    """Mean distance (pixels per frame) the centre of mass moves: 0 for still videos."""
    return motion(centre_of_mass(videos)).norm(dim=-1).mean().item()


def video_metrics(net: nn.Module, videos: torch.Tensor, labels: torch.Tensor,
                  reference: Optional[torch.Tensor] = None,
                  real_pool: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Frame accuracy, consecutive-frame similarity and mean speed of `videos` of `labels`;
    with `reference` videos of the same seeds also per-frame FID to them and the motion
    error; with `real_pool` (pooled features of real frames) the per-frame FID to those."""
    features = frame_features(net, videos)
    results = {"frame_accuracy": frame_accuracy(features.logits, labels),
               "consecutive_similarity": consecutive_similarity(features.pool, videos.shape[1]),
               "mean_speed": mean_speed(videos)}
    if reference is not None:
        results["frame_fid"] = frame_fid(features.pool, frame_features(net, reference).pool)
        results["motion_error"] = motion_error(videos, reference)
    if real_pool is not None:
        results["frame_fid_real"] = frame_fid(features.pool, real_pool)
    return results
