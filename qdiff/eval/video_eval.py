"""`python -m qdiff.eval` for class-conditional video pipelines (the embedded Wan teacher).

Every frame is an image for the digits feature network (`video_metrics`). Against the
teacher, the videos are paired: the teacher samples the *same* seeds, so the motion of
the digit can be compared video by video (and a pipeline against itself scores 0);
against `real`, the frames of held-out moving-digit clips.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torchvision.utils import save_image

from qdiff.cli import InputError
from qdiff.eval.feature_nets import load_feature_net
from qdiff.eval.sampling import SamplingSettings, balanced_labels
from qdiff.eval.video_metrics import frame_features, video_metrics
from qdiff.models.class_video_pipeline import ClassConditionalVideoPipeline
from qdiff.models.loading import load_pipeline
from qdiff.models.zoo.moving_digits import load_moving_digits


def is_video_pipeline(path: Path) -> bool:
    """Whether the folder holds a ClassConditionalVideoPipeline (teacher or export)."""
    index = path / "model_index.json"
    return index.is_file() and (json.loads(index.read_text()).get("_class_name")
                                == ClassConditionalVideoPipeline.__name__)


@torch.no_grad()
def sample_videos(pipe, labels: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Videos (N, F, C, H, W) in [0, 1]; batch b draws from seed settings.seed + b."""
    pipe.set_progress_bar_config(disable=True)
    parts = []
    for index, first in enumerate(range(0, len(labels), settings.batch_size)):
        parts.append(pipe(class_labels=labels[first:first + settings.batch_size],
                          guidance_scale=settings.guidance, num_inference_steps=settings.steps,
                          output_type="pt",
                          generator=torch.Generator().manual_seed(settings.seed + index)).frames)
    return torch.cat(parts)


def real_frames_pool(net: torch.nn.Module) -> torch.Tensor:
    """Pooled features of every frame of held-out moving-digit clips (two motions per digit)."""
    clips = load_moving_digits("held_out", copies=2, seed=1)
    return frame_features(net, (clips.clips + 1) / 2).pool


def evaluate_video(pipeline: Path, teacher: Path, reference: str, settings: SamplingSettings,
                   out: Path) -> dict:
    """Sample `pipeline`, score it against `reference` ("teacher" or "real"), write
    results.json / .md and a PNG of the first videos (one per row, frames left to right)."""
    if reference not in ("teacher", "real"):
        raise InputError(f"--reference {reference}: video pipelines are scored against "
                         f"'teacher' (paired seeds) or 'real' (held-out moving digits).")
    net, _ = load_feature_net("digits")
    labels = balanced_labels(settings.num_samples, settings.num_classes)
    videos = sample_videos(load_pipeline(pipeline), labels, settings)
    paired = sample_videos(load_pipeline(teacher), labels, settings) if reference == "teacher" else None
    results = video_metrics(net, videos, labels, reference=paired, real_pool=real_frames_pool(net))
    record = {"pipeline": str(pipeline), "reference": str(teacher) if paired is not None else "real",
              "settings": settings.__dict__, "num_videos": len(videos), "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"| metric | {pipeline.name} vs {record['reference']} |", "|---|---:|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in results.items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    first = videos[:10]
    save_image(first.flatten(0, 1), out.with_name("samples.png"), nrow=first.shape[1], padding=1)
    print("\n".join(lines))
    return record
