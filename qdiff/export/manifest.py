"""`qdiff_manifest.json`: the size and SHA-256 of every file an export wrote.

The denoiser's weights carry their own checksum (`serialization`), but the other
components -- autoencoder, text encoder, class embedder, scheduler and the configs -- are
saved by diffusers, which checks nothing: one flipped byte in `vae/` samples black images
without an error. So `export_pipeline` writes this manifest last, into the staging folder
before it is renamed into place (a partial export never has one), and `load_pipeline`
checks every listed file before loading.

    {"qdiff_manifest": 1,
     "files": {"vae/diffusion_pytorch_model.safetensors": {"size": 3818784, "sha256": "..."},
               ...}}

Paths are relative to the export folder. Files added later (a README) are not listed and
not an error; a folder without a manifest (a teacher, any diffusers pipeline) is not
checked. `content_id` names an export's contents from the manifest without reading the
weights again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from qdiff.checksums import describe_files, files_under, first_problem, well_formed

from .format import ExportFormatError

MANIFEST_FILE = "qdiff_manifest.json"
MANIFEST_VERSION = 1


def write_manifest(folder: Path) -> Path:
    """List every file under `folder` (but the manifest) with its size and SHA-256."""
    files = describe_files(folder, files_under(folder, skip=[MANIFEST_FILE]))
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps({"qdiff_manifest": MANIFEST_VERSION, "files": files}, indent=1))
    return path


def read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The manifest's file entries; None when `folder` has no manifest. A damaged manifest
    is an ExportFormatError."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ExportFormatError(f"{path}: damaged ({type(error).__name__}); re-export the "
                                f"pipeline.") from None
    version = data.get("qdiff_manifest") if isinstance(data, dict) else None
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise ExportFormatError(f"{path}: manifest version {version} is newer than this qdiff "
                                f"reads ({MANIFEST_VERSION}); upgrade qdiff, or load with "
                                f"verify=False to skip the check.")
    if version != MANIFEST_VERSION or not well_formed(data.get("files")):
        raise ExportFormatError(f"{path}: damaged (not a qdiff manifest of version "
                                f"{MANIFEST_VERSION}); re-export the pipeline.")
    return data["files"]


def verify_manifest(folder: Path) -> bool:
    """Check every file the manifest lists (present, size, SHA-256); True when checked,
    False when `folder` has no manifest. The first problem is an ExportFormatError that
    names the file and the fix."""
    files = read_manifest(folder)
    if files is None:
        return False
    problem = first_problem(folder, files)
    if problem:
        raise ExportFormatError(f"{folder}: {problem}; the export was damaged after it was "
                                f"written. Re-export it (or copy it again).")
    return True


def content_id(folder: Path) -> str | None:
    """A short hash of the manifest's entries: it changes when any listed file does. None
    without a manifest."""
    files = read_manifest(folder)
    if files is None:
        return None
    text = json.dumps(files, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
