"""`export_pipeline`: the teacher pipeline with its denoiser replaced by the integer model.

The folder is a normal diffusers pipeline: the teacher's other components (autoencoder,
text encoder, tokenizer, scheduler, class embedder) are saved as they are, and
`model_index.json` names the integer denoiser class. It is written into a hidden
temporary folder beside `out_dir` and renamed into place only when complete, so an
interrupted export never looks like a finished one. The last file written there is
`qdiff_manifest.json` (`manifest`): the size and SHA-256 of every other file, which
`qdiff.load_pipeline` checks, so a damaged component is refused by name instead of
sampling wrong images.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Union

from diffusers import DiffusionPipeline
from torch import nn

from qdiff.config import QuantConfig

from .manifest import write_manifest
from .models import quantized_class_for

DENOISER_NAMES = ("unet", "transformer")


def denoiser_name(pipe: DiffusionPipeline, student: nn.Module) -> str:
    """The pipeline component that `student` is a quantized copy of."""
    for name in DENOISER_NAMES:
        if type(pipe.components.get(name)) is type(student):
            return name
    raise ValueError(f"The pipeline {type(pipe).__name__} has no '{DENOISER_NAMES}' component of "
                     f"the student's class {type(student).__name__}.")


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Rename `staging` to `out_dir`; an existing `out_dir` is removed only afterwards."""
    old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
    had_old = out_dir.exists()
    if had_old:
        os.replace(out_dir, old)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        if had_old:
            os.replace(old, out_dir)
        raise
    if had_old:
        shutil.rmtree(old)


def export_pipeline(pipe: DiffusionPipeline, student: nn.Module, out_dir: Union[str, Path],
                    quant_cfg: QuantConfig, check: Optional[Callable[[Path], None]] = None) -> Path:
    """Write `pipe` with `student` as packed integer denoiser to `out_dir`; return its path.

    `student` is a quantized, calibrated copy of the pipeline's denoiser (LoRA merged or
    not); it is not modified. Raises ValueError naming the layers if Phi remains.
    `quant_cfg` is recorded as the recipe in the denoiser's `quantization_config`.
    `check(folder)` runs on the written folder before it is renamed into place; when it
    raises, nothing is left at `out_dir` (an existing export there stays as it was).
    The folder's manifest lists every file written here; files added later are not in it.
    """
    name = denoiser_name(pipe, student)
    recipe: dict[str, Any] = dataclasses.asdict(quant_cfg)
    model = quantized_class_for(student).from_student(student, recipe)
    exported = copy.copy(pipe)  # shares the teacher's components; its config is its own
    exported.register_modules(**{name: model})
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        exported.save_pretrained(staging)
        if check is not None:
            check(staging)
        write_manifest(staging)
        _replace_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir
