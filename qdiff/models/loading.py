"""`load_pipeline`: the one loader every teacher and every export of qdiff goes through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

import qdiff.export  # noqa: F401  (model_index.json of exports names its denoiser classes)
from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline

# Pipelines that qdiff defines; any other `_class_name` is one of diffusers' own.
QDIFF_PIPELINES: dict[str, type[DiffusionPipeline]] = {
    ClassConditionalLDMPipeline.__name__: ClassConditionalLDMPipeline,
}


def _pipeline_class(folder: Path) -> type[DiffusionPipeline]:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json. "
            f"Point at the folder that `save_pretrained` wrote (it holds model_index.json "
            f"and one sub-folder per component).")
    try:
        class_name = json.loads(index_file.read_text())["_class_name"]
    except (json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{index_file} is not a valid model index ({error}); "
                         f"re-export the pipeline.") from None
    return QDIFF_PIPELINES.get(class_name, DiffusionPipeline)


def load_pipeline(path: str | Path, **kwargs: Any) -> DiffusionPipeline:
    """Load a pipeline folder (a qdiff teacher or export, or any diffusers pipeline).

    Keyword arguments go to `from_pretrained` (for example `torch_dtype`).
    """
    folder = Path(path)
    if folder.is_dir():
        return _pipeline_class(folder).from_pretrained(folder, **kwargs)
    if folder.exists():
        raise FileNotFoundError(f"'{path}' is a file; give the pipeline folder that holds "
                                f"model_index.json (for example assets/tiny-ldm-digits).")
    try:
        return DiffusionPipeline.from_pretrained(str(path), **kwargs)
    except Exception as error:  # the hub client raises many types; all mean "not available"
        raise FileNotFoundError(
            f"No pipeline folder at '{path}', and it could not be loaded as a hub id "
            f"({type(error).__name__}: {error}). Without a network, download the pipeline "
            f"elsewhere and pass its local folder, or set HF_HUB_OFFLINE=1 with the model "
            f"already in the hub cache.") from None
