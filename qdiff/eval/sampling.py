"""Batched, seeded, resumable sampling of class-conditional pipelines for evaluation.

Samples are cached in an ADM `.npz` per key (`SamplingSettings.cache_key`), and the key
covers what decides the images: the model's contents (`model_content_id`: an export's
manifest checksums, or the files' sizes and modification times for a folder without a
manifest), steps, guidance, seed, batch size, number of classes, the number of samples
where it changes the last batch, and the qdiff version. So a model retrained into the same
folder, or other settings, sample afresh, and a stopped run with the same key resumes. A
cache that cannot be read (it is our own file) is discarded with a warning and sampled
again.
"""

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

import qdiff
from qdiff.checksums import files_under
from qdiff.eval.npz import NpzError, load_samples, save_samples, to_uint8_nhwc
from qdiff.export.manifest import content_id

logger = logging.getLogger("qdiff.eval")


@dataclass(frozen=True)
class SamplingSettings:
    num_samples: int = 1000
    steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    batch_size: int = 100
    num_classes: int = 10

    def cache_key(self, content: str) -> str:
        """The name of the samples of the model whose contents are `content`
        (`model_content_id`) under these settings.

        Batch b is drawn from seed + b, so with full batches the first N samples are the same
        for any larger number: the number of samples joins the key only when the last batch
        is partial, and a cache of N full batches serves (and grows for) any multiple."""
        settings = asdict(self)
        if self.num_samples % self.batch_size == 0:
            del settings["num_samples"]
        text = json.dumps({"content": content, "qdiff": qdiff.__version__, **settings},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def model_content_id(folder: Path) -> str:
    """What a pipeline folder holds, cheaply: an export's manifest checksums (checked when it
    was loaded); for a folder without a manifest, every file's path, size and modification
    time -- a retrained or copied model changes it (and samples afresh), reading no weights."""
    from_manifest = content_id(folder)
    if from_manifest is not None:
        return f"manifest:{from_manifest}"
    stats = [(name, (folder / name).stat()) for name in files_under(folder)]
    text = json.dumps([(name, stat.st_size, stat.st_mtime_ns) for name, stat in stats])
    return f"files:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


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
    if cache is not None:
        done = _cached(cache, settings)
        logger.info("sample cache %s: %s", cache, f"reusing {len(done[0])} samples" if done
                    else f"none yet, sampling {settings.num_samples}")
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


def _cached(cache: Path, settings: SamplingSettings) -> list[np.ndarray]:
    """The full batches of `cache` that this run can use ([] without one). A cache that
    cannot be read or does not hold what its key promises is deleted with a warning."""
    if not cache.is_file():
        return []
    try:
        images, labels = load_samples(cache)
        problem = _cache_problem(images, labels, settings)
    except NpzError as error:
        problem = error.reason
    except OSError as error:
        problem = f"unreadable ({error.strerror or type(error).__name__})"
    if problem:
        logger.warning("%s: damaged sample cache (%s); discarding it and sampling again",
                       cache, problem)
        cache.unlink()
        return []
    usable = len(images) if len(images) >= settings.num_samples else \
        len(images) - len(images) % settings.batch_size  # resume after the last full batch
    return [images[:usable]] if usable else []


def _cache_problem(images: np.ndarray, labels: np.ndarray | None,
                   settings: SamplingSettings) -> str:
    """What `load_samples` does not check: the labels are the ones this cache's key draws."""
    expected = balanced_labels(len(images), settings.num_classes).numpy()
    if labels is None or not np.array_equal(labels, expected):
        return "labels are not the balanced classes"
    return ""
