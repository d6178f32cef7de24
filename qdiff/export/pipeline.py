"""`export_pipeline`: the teacher pipeline with its denoiser(s) replaced by integer models.

The folder is a normal diffusers pipeline: the teacher's other components (autoencoder,
text encoder, tokenizer, scheduler, class embedder) are saved as they are, and
`model_index.json` names the integer class of each exported denoiser (several for
pipelines with several, e.g. Wan 2.2's `transformer` and `transformer_2`). It is written into a hidden
temporary folder beside `out_dir` and renamed into place only when complete, so an
interrupted export never looks like a finished one. The last file written there is
`qdiff_manifest.json` (`manifest`): the size and SHA-256 of every other file, which
`qdiff.load_pipeline` checks, so a damaged component is refused by name instead of
sampling wrong images.

`format="torchao"` writes the portable form instead (`torchao_format`): each denoiser is
its plain diffusers class with torchao int8 weights, and the folder loads with stock
`DiffusionPipeline.from_pretrained(path, dtype=...)` where torchao is installed and
qdiff is not.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from diffusers import DiffusionPipeline
from torch import nn

from qdiff.config import QuantConfig
from qdiff.walk import DENOISER_COMPONENTS

from .manifest import write_manifest
from .models import quantized_class_for

FORMATS = ("qdiff", "torchao")

Students = Union[nn.Module, Mapping[str, nn.Module]]


def denoiser_name(pipe: DiffusionPipeline, student: nn.Module) -> str:
    """The first denoiser component (in `DENOISER_COMPONENTS` order) of `student`'s class.

    Args:
        pipe: The pipeline.
        student: A student of one of its denoisers.

    Returns:
        The component name.

    Raises:
        ValueError: No denoiser component of `pipe` has the student's class.
    """
    for name in DENOISER_COMPONENTS:
        if type(pipe.components.get(name)) is type(student):
            return name
    raise ValueError(f"The pipeline {type(pipe).__name__} has no {list(DENOISER_COMPONENTS)} "
                     f"component of the student's class {type(student).__name__}.")


def _named_students(pipe: DiffusionPipeline, students: Students) -> dict[str, nn.Module]:
    """{component: student}, each component checked to exist and to be of its student's class."""
    if isinstance(students, nn.Module):
        return {denoiser_name(pipe, students): students}
    if not isinstance(students, Mapping) or not students:
        raise ValueError(f"export_pipeline takes a student model or a non-empty mapping "
                         f"{{component name: student}}, not {students!r:.80}.")
    pipe_name = type(pipe).__name__
    models = [name for name, value in pipe.components.items() if isinstance(value, nn.Module)]
    for name, student in students.items():
        component = pipe.components.get(name)
        if not isinstance(component, nn.Module):
            raise ValueError(f"The pipeline {pipe_name} has no model component '{name}' to export "
                             f"a student as; its model components are {models}.")
        if type(component) is not type(student):
            raise ValueError(f"The pipeline {pipe_name}'s component '{name}' is a "
                             f"{type(component).__name__}, but its student is a "
                             f"{type(student).__name__}.")
    return dict(students)


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


def export_pipeline(pipe: DiffusionPipeline, students: Students, out_dir: Union[str, Path],
                    quant_cfg: QuantConfig, check: Optional[Callable[[Path], None]] = None,
                    format: str = "qdiff") -> Path:
    """Write `pipe` with packed integer denoiser(s) to `out_dir`; return its path.

    `students` maps component names to quantized, calibrated copies of those components
    (LoRA merged or not), e.g. `{"transformer": s1, "transformer_2": s2}`; a single model
    stands for the first of `qdiff.walk.DENOISER_COMPONENTS` of its class. Each named
    component must exist and be of its student's class (ValueError naming it otherwise).
    Students are not modified. Raises ValueError naming the layers if Phi remains.
    `quant_cfg` is recorded as the recipe in each denoiser's `quantization_config`.
    `check(folder)` runs on the written folder before it is renamed into place; when it
    raises, nothing is left at `out_dir` (an existing export there stays as it was).
    The folder's manifest lists every file written here; files added later are not in it.
    `format`: "qdiff" (integer layers, loads after `import qdiff`) or "torchao" (stock
    diffusers classes with torchao weights, see `torchao_format`; raises
    `TorchaoExportError` naming the layers only qdiff computes).

    Args:
        pipe: The teacher pipeline; its other components are written as they are.
        students: `{component: student}`, or one student.
        out_dir: The export folder to write.
        quant_cfg: The run's `quant` block, recorded as the recipe.
        check: Called with the staging folder before it is moved into place.
        format: "qdiff" or "torchao".

    Returns:
        `out_dir`, as a `Path`.

    Raises:
        ValueError: `format` is unknown, a component is missing or of another class than its
            student, or a student still has Phi layers.
        TorchaoExportError: With "torchao", a student has layers only qdiff computes.
        TorchaoMissingError: With "torchao", torchao >= 0.16 is not installed.
    """
    if format not in FORMATS:
        raise ValueError(f"export_pipeline: format={format!r} is not one of {list(FORMATS)}.")
    named = _named_students(pipe, students)
    recipe: dict[str, Any] = dataclasses.asdict(quant_cfg)
    if format == "torchao":
        from .torchao_format import torchao_model
        models = {name: torchao_model(student, recipe) for name, student in named.items()}
    else:
        classes = {name: quantized_class_for(student) for name, student in named.items()}
        models = {name: classes[name].from_student(student, recipe) for name, student in named.items()}
    exported = copy.copy(pipe)  # shares the teacher's components; its config is its own
    exported.register_modules(**models)
    return _write(exported, Path(out_dir), check)


def convert_export(src: Union[str, Path], out_dir: Union[str, Path], format: str = "torchao") -> Path:
    """Rewrite the qdiff export at `src` in `format` ("torchao": see `torchao_format`) at
    `out_dir`, from its stored codes and scales (no student needed); `src` is checked
    against its manifest first. Written atomically, with a manifest, as `export_pipeline`.

    Args:
        src: A qdiff export folder.
        out_dir: The folder to write.
        format: The format to write; only "torchao".

    Returns:
        `out_dir`, as a `Path`.

    Raises:
        ValueError: `format` is not "torchao", or `src` holds no qdiff integer denoiser.
        ExportFormatError: A file of `src` differs from its manifest.
        TorchaoExportError: The export has layers only qdiff computes.
        TorchaoMissingError: torchao >= 0.16 is not installed.
    """
    from qdiff.models.loading import load_pipeline

    from .models import QuantizedModelMixin
    from .torchao_format import torchao_model_from_export

    if format != "torchao":
        raise ValueError(f"convert_export: format={format!r}; only 'torchao' converts.")
    pipe = load_pipeline(src)
    models = {name: torchao_model_from_export(model) for name, model in pipe.components.items()
              if isinstance(model, QuantizedModelMixin)}
    if not models:
        raise ValueError(f"{src}: no qdiff integer denoiser to convert (is it a qdiff export?).")
    pipe.register_modules(**models)
    return _write(pipe, Path(out_dir), None)


def _write(exported: DiffusionPipeline, out_dir: Path, check: Optional[Callable[[Path], None]]) -> Path:
    """`exported.save_pretrained` into a staging folder beside `out_dir`, `check` it, add the
    manifest, rename it into place."""
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
