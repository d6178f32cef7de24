"""`load_pipeline`: the one loader every teacher and every export of qdiff goes through.

An export's files are checked against its manifest before anything is loaded
(`qdiff.export.manifest`); a folder without one (a teacher, any diffusers pipeline) loads
unchecked, as diffusers would load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline
from safetensors import SafetensorError

import qdiff.export  # noqa: F401  (model_index.json of exports names its denoiser classes)
from qdiff.errors import QdiffError
from qdiff.export.manifest import verify_manifest
from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline
from qdiff.models.class_video_pipeline import ClassConditionalVideoPipeline
from qdiff.models.hub import hub_snapshot, looks_like_hub_id, missing_pipeline_files


class PipelineLoadError(QdiffError, ValueError):
    """A pipeline folder's index or one of its components cannot be read."""


# Pipelines that qdiff defines; any other `_class_name` is one of diffusers' own.
QDIFF_PIPELINES: dict[str, type[DiffusionPipeline]] = {
    pipeline.__name__: pipeline
    for pipeline in (ClassConditionalLDMPipeline, ClassConditionalVideoPipeline)
}


def read_model_index(folder: Path) -> dict[str, Any]:
    """The pipeline folder's `model_index.json`, refused by name when it is not one."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json. "
            f"Point at the folder that `save_pretrained` wrote (it holds model_index.json "
            f"and one sub-folder per component).")
    try:
        index = json.loads(index_file.read_text())
        index["_class_name"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise PipelineLoadError(f"{index_file} is not a valid model index ({error}); "
                                f"re-export the pipeline.") from None
    return index


def absent_components(folder: Path) -> dict[str, None]:
    """`{name: None}` for the components the model index records as absent (`[null, null]`,
    e.g. SD3's optional T5): diffusers 0.42 saves them so but does not load them back
    unless they are passed as None."""
    index = read_model_index(folder)
    return {name: None for name, value in index.items()
            if not name.startswith("_") and value == [None, None]}


def _pipeline_class(folder: Path) -> type[DiffusionPipeline]:
    return QDIFF_PIPELINES.get(read_model_index(folder)["_class_name"], DiffusionPipeline)


def load_pipeline(path: str | Path, verify: bool = True, **kwargs: Any) -> DiffusionPipeline:
    """Load a pipeline folder (a qdiff teacher or export, or any diffusers pipeline).

    With `verify` (the default), every file an export's `qdiff_manifest.json` lists is
    checked first -- present, its size, its SHA-256 -- and the first that differs is an
    `ExportFormatError` naming it: a damaged autoencoder would otherwise sample wrong images
    without an error. This reads every weight once more; `verify=False` skips it, for
    speed, where the folder is known to be intact (the denoiser's own checksum is checked
    either way). Folders without a manifest load unchecked.
    Other keyword arguments go to `from_pretrained` (for example `dtype`).
    A name that is not a local path but looks like a hub id (`owner/name`) comes from the
    hub cache, downloaded first when there is a network (`qdiff.models.hub`).

    Args:
        path: A pipeline folder, or a hub id (`owner/name`).
        verify: Check the files an export's manifest lists before loading.
        **kwargs: Passed to `DiffusionPipeline.from_pretrained`.

    Returns:
        The loaded pipeline, of the class its `model_index.json` names.

    Raises:
        FileNotFoundError: `path` is a file, names no folder and no reachable hub id, or the
            folder lacks a component its model index lists.
        ExportFormatError: A file the export's manifest lists is missing or differs from it.
        PipelineLoadError: The model index is not valid, or a component cannot be loaded.
    """
    folder = Path(path)
    if folder.is_file():
        raise FileNotFoundError(f"'{path}' is a file; give the pipeline folder that holds "
                                f"model_index.json (for example assets/tiny-ldm-digits).")
    if not folder.exists():
        if not looks_like_hub_id(str(path)):
            raise FileNotFoundError(f"No pipeline folder at '{path}', and it could not be "
                                    f"loaded as a hub id (those read owner/name). Give a local "
                                    f"pipeline folder.")
        folder = hub_snapshot(str(path))
    if verify:
        verify_manifest(folder)
    pipeline_class = _pipeline_class(folder)
    missing = missing_pipeline_files(folder)
    if missing:
        raise FileNotFoundError(f"The pipeline folder {folder} is incomplete; missing: "
                                f"{', '.join(missing)}. Copy the whole folder that "
                                f"`save_pretrained` or `huggingface-cli download` wrote.")
    try:
        return pipeline_class.from_pretrained(folder, **{**absent_components(folder), **kwargs})
    except QdiffError:
        raise
    except (OSError, ValueError, SafetensorError) as error:  # a component diffusers cannot read
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise PipelineLoadError(f"{folder}: a component could not be loaded ({reason}); the "
                                f"folder is damaged or incomplete. Re-export or copy it "
                                f"again.") from error
