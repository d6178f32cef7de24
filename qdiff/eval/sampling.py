"""Batched, seeded, resumable sampling of any family's pipeline for evaluation.

Conditions are the family's (`qdiff.families`): class ids, balanced over the classes
(0, 1, ..., n-1, 0, ...), or the lines of a prompt file, cycled. Every sample j draws its
noise from a generator of its own, seeded (seed, j) (`qdiff.distill.samples.sample_generators`),
so a sample does not depend on the batch it is drawn in. A video family's sample is a video:
its frames are kept side by side in the cache, and each frame is an image for the feature
metrics (`Samples.images`: scored per frame).

Samples are cached in an ADM `.npz` per key (`SamplingSettings.cache_key`), and the key
covers what decides the images: the model's contents (`model_content_id`: an export's
manifest checksums, or the files' sizes and modification times for a folder without a
manifest), the family, the conditions (number of classes, or a hash of the prompts), the
sample size, steps, guidance, seed, batch size, the number of samples where it changes the
last batch, the sampling scheme and the qdiff version. So a model retrained into the same
folder, another prompt file or other settings sample afresh, a cache of an older scheme
(one generator per batch) is never read, and a stopped run with the same key resumes. A
cache that cannot be read (it is our own file) is discarded with a warning and sampled
again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

import qdiff
from qdiff.checksums import files_under
from qdiff.cli import InputError
from qdiff.eval.npz import NpzError, load_samples, save_samples, to_uint8_nhwc
from qdiff.export.manifest import content_id

logger = logging.getLogger("qdiff.eval")
# joins every cache key: samples drawn another way (one generator per batch, before) are
# never mistaken for these
SAMPLING_SCHEME = "per-sample-generators"
FRAMES_KEY = "frames"  # the cache's extra array: frames side by side in each image


class ConditionError(InputError):
    """The conditions cannot be sampled: a prompt family without prompts, an empty prompt
    file, class ids out of range."""


@dataclass(frozen=True)
class SamplingSettings:
    num_samples: int = 1000
    steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    batch_size: int = 100
    num_classes: int = 10  # the number of conditions: classes, or prompt lines
    family: str = ""  # the family's registered name (`settings_for`); "" for a bare pipe
    prompts: str = ""  # `prompts_id` of the prompt lines; "" for class ids
    size: Optional[tuple[int, ...]] = None  # (H, W) or (F, H, W); None: the pipeline's own

    def cache_key(self, content: str) -> str:
        """The name of the samples of the model whose contents are `content`
        (`model_content_id`) under these settings.

        Sample j is drawn from its own generator, so with full batches the first N samples
        are the same for any larger number: the number of samples joins the key only when
        the last batch is partial, and a cache of N full batches serves (and grows for) any
        multiple."""
        settings = asdict(self)
        if self.num_samples % self.batch_size == 0:
            del settings["num_samples"]
        text = json.dumps({"content": content, "qdiff": qdiff.__version__,
                           "sampling": SAMPLING_SCHEME, **settings}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class Samples(NamedTuple):
    """What was sampled, as the metrics see it: every frame of a video is an image."""

    images: np.ndarray  # uint8 (N * frames, H, W, C)
    labels: Optional[np.ndarray]  # the condition id of each image (None: an unlabelled .npz)
    frames: int = 1  # images per sample (a video's frames, in order)
    conditions: str = "classes"  # what the labels are: "classes" or "prompts"


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
    """0, 1, ..., 9, 0, 1, ...: every class (or prompt line) equally often (to within one)."""
    return torch.arange(num_samples) % num_classes


# -- conditions ------------------------------------------------------------------------------
def read_prompt_file(path: Union[str, Path], option: str = "--prompts") -> list[str]:
    """The prompts of a file: its non-empty lines, a line starting with '#' a comment."""
    file = Path(path)
    if not file.is_file():
        raise ConditionError(f"{option} {path}: no such file; give a text file with one prompt "
                             f"per line.")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ConditionError(f"{option} {path} holds no prompts; write one prompt per line "
                             f"(a line starting with '#' is a comment).")
    return prompts


def prompts_id(prompts: Optional[Sequence[str]]) -> str:
    """A hash of the prompt lines (what the samples are conditioned on); "" without prompts."""
    if not prompts:
        return ""
    return "sha256:" + hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


def family_class_of_index(index: dict):
    """The family class a model index's pipeline class is declared by (None: not known
    before loading, e.g. a family that decides by `matches`)."""
    from qdiff.families import FAMILIES

    name = index.get("_class_name")
    return next((family for family in FAMILIES.values() if name in family.pipelines), None)


def check_conditions(family_cls, source: str, prompts: Optional[str], option: str = "--pipeline",
                     classes: Optional[Sequence[int]] = None) -> None:
    """Refuse conditions that `family_cls` cannot sample, before any pipeline is loaded."""
    if family_cls is None:
        return
    if family_cls.conditions == "prompts":
        if prompts is None:
            raise ConditionError(f"{option} {source} is a {family_cls.name} pipeline, "
                                 f"conditioned on prompts: give --prompts FILE (one prompt per "
                                 f"line).")
        if classes is not None:
            raise ConditionError(f"--classes: {option} {source} is a {family_cls.name} pipeline, "
                                 f"conditioned on prompts, not class ids; give --prompts FILE "
                                 f"instead.")
        read_prompt_file(prompts)
    elif prompts is not None:
        raise ConditionError(f"--prompts {prompts}: {option} {source} is a {family_cls.name} "
                             f"pipeline, conditioned on class ids; leave --prompts out (or give "
                             f"--classes).")


def check_classes(classes: Sequence[int], num_classes: int, source: str,
                  option: str = "--pipeline") -> None:
    outside = sorted({label for label in classes if not 0 <= label < num_classes})
    if outside:
        raise ConditionError(f"--classes {','.join(map(str, outside))}: the pipeline {source} "
                             f"has classes 0..{num_classes - 1}; give classes in that range.")


def family_of(pipe, prompts: Optional[str] = None, size: Optional[Sequence[int]] = None,
              source: Optional[str] = None, option: str = "--pipeline"):
    """The family of a loaded pipeline, with the prompt file `prompts` (prompt families) and
    the sample size `size` ((H, W), or (F, H, W) for a video family; None: the pipeline's)."""
    from qdiff.config import ModelConfig
    from qdiff.families import family_class

    family_cls = family_class(pipe)
    source = source or str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)
    check_conditions(family_cls, source, prompts, option)
    if size is not None and len(size) != (3 if family_cls.video else 2):
        raise ConditionError(f"--size {','.join(map(str, size))}: {option} {source} makes "
                             f"{'videos; give --size FRAMES,HEIGHT,WIDTH' if family_cls.video else 'images; give --size HEIGHT,WIDTH'}.")
    sizes = {("video_size" if family_cls.video else "image_size"): list(size)} if size else {}
    return family_cls(pipe, ModelConfig(prompts=str(prompts) if prompts else None, **sizes))


def settings_for(family, settings: SamplingSettings) -> SamplingSettings:
    """`settings` with what `family` samples: its name, conditions and size (the cache key's)."""
    return replace(settings, family=family.name, num_classes=family.num_conditions,
                   prompts=prompts_id(family.prompts if family.conditions == "prompts" else None),
                   size=tuple(family.size) if family.size is not None else None)


# -- sampling ------------------------------------------------------------------------------
@torch.no_grad()
def _sample_batch(family, ids: torch.Tensor, settings: SamplingSettings,
                  index: int) -> tuple[np.ndarray, int]:
    """Batch `index` (samples index * batch_size, ...): uint8 images (a video's frames side
    by side) and the number of frames in each."""
    from qdiff.distill.samples import sample_generators
    from qdiff.families import frames_side_by_side

    generators = sample_generators(settings.seed, len(ids), start=index * settings.batch_size)
    kwargs = family.call_kwargs(ids, generators, settings.steps, settings.guidance,
                                output_type="pt")
    samples = family.to_samples(family.pipe(**kwargs))
    if family.video:
        return to_uint8_nhwc(frames_side_by_side(samples)), samples.shape[1]
    return to_uint8_nhwc(samples), 1


def split_frames(images: np.ndarray, frames: int) -> np.ndarray:
    """(N, H, F * W, C) frames side by side -> (N * F, H, W, C), video by video."""
    if frames == 1:
        return images
    n, height, width, channels = images.shape
    return (images.reshape(n, height, frames, width // frames, channels)
            .transpose(0, 2, 1, 3, 4).reshape(n * frames, height, width // frames, channels))


def generate(pipe, settings: SamplingSettings,
             cache: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, H, W, C) samples and their condition ids (a video's frames: an image each,
    with its video's id); see `generate_samples`."""
    samples = generate_samples(pipe, settings, cache)
    return samples.images, samples.labels


def generate_samples(pipe, settings: SamplingSettings, cache: Optional[Path] = None) -> Samples:
    """`settings.num_samples` samples of `pipe` (a pipeline, or its `Family`), their
    conditions cycling through `settings.num_classes` class ids or prompt lines.

    With `cache`, finished batches are kept in an ADM `.npz` after each batch, and a
    rerun with the same settings starts where the last one stopped.
    """
    from qdiff.families import Family, family_for

    family = pipe if isinstance(pipe, Family) else family_for(pipe)
    labels = balanced_labels(settings.num_samples, settings.num_classes)
    done: list[np.ndarray] = []
    frames = None
    if cache is not None:
        done, frames = _cached(cache, settings, family.video)
        logger.info("sample cache %s: %s", cache, f"reusing {len(done[0])} samples" if done
                    else f"none yet, sampling {settings.num_samples}")
    start = sum(len(part) for part in done)
    family.pipe.set_progress_bar_config(disable=True)
    starts = range(start, settings.num_samples, settings.batch_size)
    for first in tqdm(starts, desc=f"sampling {settings.num_samples}", unit="batch",
                      initial=start // settings.batch_size,
                      total=-(-settings.num_samples // settings.batch_size)):
        batch_labels = labels[first:first + settings.batch_size]
        images, frames = _sample_batch(family, batch_labels, settings, first // settings.batch_size)
        done.append(images)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            so_far = np.concatenate(done)
            save_samples(cache, so_far, labels[:len(so_far)].numpy(),
                         **{FRAMES_KEY: np.array([frames], np.int64)})
    images = np.concatenate(done)[:settings.num_samples]
    frames = frames or 1
    return Samples(split_frames(images, frames), np.repeat(labels.numpy(), frames), frames,
                   family.conditions)


def _cached(cache: Path, settings: SamplingSettings,
            video: bool = False) -> tuple[list[np.ndarray], Optional[int]]:
    """The full batches of `cache` that this run can use ([] without one), and the frames of
    each (an image cache without the count has one). A cache that cannot be read or does
    not hold what its key promises is deleted with a warning."""
    if not cache.is_file():
        return [], None
    frames = None
    try:
        images, labels = load_samples(cache)
        problem = _cache_problem(images, labels, settings)
        if not problem:
            with np.load(cache, allow_pickle=False) as data:
                frames = (int(data[FRAMES_KEY][0]) if FRAMES_KEY in data
                          else None if video else 1)
            if frames is None or frames < 1 or images.shape[2] % frames:
                problem = "no frame count"
    except NpzError as error:
        problem = error.reason
    except (OSError, ValueError, IndexError) as error:
        problem = f"unreadable ({getattr(error, 'strerror', None) or type(error).__name__})"
    if problem:
        logger.warning("%s: damaged sample cache (%s); discarding it and sampling again",
                       cache, problem)
        cache.unlink()
        return [], None
    usable = len(images) if len(images) >= settings.num_samples else \
        len(images) - len(images) % settings.batch_size  # resume after the last full batch
    return ([images[:usable]], frames) if usable else ([], None)


def _cache_problem(images: np.ndarray, labels: np.ndarray | None,
                   settings: SamplingSettings) -> str:
    """What `load_samples` does not check: the labels are the ones this cache's key draws."""
    expected = balanced_labels(len(images), settings.num_classes).numpy()
    if labels is None or not np.array_equal(labels, expected):
        return ("labels are not the cycled prompt lines" if settings.prompts
                else "labels are not the balanced classes")
    return ""
