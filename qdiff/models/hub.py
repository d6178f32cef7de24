"""Pipelines named by a hub id: from the local hub cache, or downloaded when there is a network.

Offline first: with `HF_HUB_OFFLINE=1` (or no network) only the cache is read, and a
pipeline that is not complete there is an error that lists the files it lacks and says
how to provide them -- never a half-loaded model or a hang on a network timeout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

from huggingface_hub import constants, snapshot_download

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a diffusers pipeline needs: configs and safetensors of each component, nothing else
ALLOW = ["model_index.json", "*/*.json", "*/*.txt", "*/*.model", "*/*.safetensors"]
IGNORE = ["*.fp16.*", "*non_ema*", "*.ckpt", "*.bin", "*.onnx", "*.msgpack", "*.h5"]


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name))


def _component_files(name: str, class_name: str) -> list[str]:
    """The files a component folder must hold for `from_pretrained` (one weights file stands
    for any *.safetensors, sharded or not)."""
    if class_name.endswith("Scheduler"):
        return [f"{name}/scheduler_config.json"]
    if "Tokenizer" in class_name:
        return [f"{name}/tokenizer_config.json"]
    if class_name.endswith(("FeatureExtractor", "ImageProcessor")):
        return [f"{name}/preprocessor_config.json"]
    return [f"{name}/config.json", f"{name}/*.safetensors"]


def missing_pipeline_files(folder: Union[str, Path]) -> list[str]:
    """Files of a pipeline folder that are absent (relative paths; [] when complete)."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return ["model_index.json (and the component folders it names)"]
    index = json.loads(index_file.read_text())
    missing = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[1] is None:
            continue
        for pattern in _component_files(name, spec[1]):
            if not any(folder.glob(pattern)):
                missing.append(pattern)
    return missing


def _cached_snapshot(repo_id: str, cache_dir: Optional[Path]) -> Optional[Path]:
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except Exception:  # the hub client raises several types for "not in the cache"
        return None


def hub_snapshot(repo_id: str, cache_dir: Optional[Union[str, Path]] = None,
                 offline: Optional[bool] = None) -> Path:
    """The local folder of hub pipeline `repo_id`; raises FileNotFoundError naming what is missing.

    Online, the configs and safetensors weights are downloaded into the hub cache (no
    fp16/non-EMA variants, no pickles); offline, only the cache is read.
    """
    offline = constants.is_offline_mode() if offline is None else offline
    cache = Path(cache_dir) if cache_dir is not None else None
    folder, reason = None, "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=ALLOW,
                                            ignore_patterns=IGNORE))
        except Exception as error:  # no network, no such repo, no access: all "not here"
            reason = f"the download failed ({type(error).__name__})"
    folder = folder or _cached_snapshot(repo_id, cache)
    missing = missing_pipeline_files(folder) if folder else missing_pipeline_files("/nonexistent")
    if missing:
        where = cache or constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"'{repo_id}' is neither a local folder nor a hub pipeline available here "
            f"({reason}); missing from the hub cache {where}: {', '.join(missing)}. Provide "
            f"it in one of two ways: on a machine with a network run `huggingface-cli download {repo_id} --local-dir <folder>`, copy "
            f"the folder here and set model.path=<folder>; or run `huggingface-cli download "
            f"{repo_id}` there, copy its hub cache (~/.cache/huggingface/hub) here and run with "
            f"HF_HUB_OFFLINE=1.")
    return folder
