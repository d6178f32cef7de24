"""Batched, seeded, resumable sampling of class-conditional pipelines for evaluation."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from qdiff.eval.npz import load_samples, save_samples, to_uint8_nhwc

logger = logging.getLogger("qdiff.eval")


@dataclass(frozen=True)
class SamplingSettings:
    num_samples: int = 1000
    steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    batch_size: int = 100
    num_classes: int = 10

    def cache_key(self, pipeline: str) -> str:
        text = json.dumps({"pipeline": str(Path(pipeline).resolve()), **asdict(self)},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def balanced_labels(num_samples: int, num_classes: int = 10) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ...: every class equally often (to within one)."""
    return torch.arange(num_samples) % num_classes


@torch.no_grad()
def _sample_batch(pipe, labels: torch.Tensor, settings: SamplingSettings, index: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(settings.seed + index)  # batch b: seed + b
    images = pipe(class_labels=labels, guidance_scale=settings.guidance,
                  num_inference_steps=settings.steps, generator=generator,
                  output_type="pt").images
    return to_uint8_nhwc(images)


def generate(pipe, settings: SamplingSettings,
             cache: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C) samples and their labels, balanced over the classes.

    With `cache`, finished batches are kept in an ADM `.npz` after each batch, and a
    rerun with the same settings starts where the last one stopped.
    """
    labels = balanced_labels(settings.num_samples, settings.num_classes)
    done: list[np.ndarray] = []
    if cache is not None and cache.is_file():
        images, _ = load_samples(cache)
        done = [images]
        logger.info("reusing %d samples from %s", len(images), cache)
    start = sum(len(part) for part in done)
    pipe.set_progress_bar_config(disable=True)
    starts = range(start, settings.num_samples, settings.batch_size)
    for first in tqdm(starts, desc=f"sampling {settings.num_samples}", unit="batch",
                      initial=start // settings.batch_size,
                      total=-(-settings.num_samples // settings.batch_size)):
        batch_labels = labels[first:first + settings.batch_size]
        done.append(_sample_batch(pipe, batch_labels, settings, first // settings.batch_size))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            so_far = np.concatenate(done)
            save_samples(cache, so_far, labels[:len(so_far)].numpy())
    return np.concatenate(done)[:settings.num_samples], labels.numpy()
