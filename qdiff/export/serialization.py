"""Writing and reading the integer denoiser's one safetensors file, with integrity checks.

safetensors itself checks little: a file cut short after its header, or with changed
bytes, can load into wrong numbers. So the writer records the file's SHA-256 in
config.json, and the reader checks, in order: the file exists, its header parses, its
size is what the header promises (truncation), the checksum (any other change), then
that every tensor the model needs is there with its shape and integer dtype. Each
failure is an `ExportFormatError` that names the file and the problem.

The tensors are read into memory the model owns, not left as views of safetensors'
memory map: the mapping stays alive as long as any one of its tensors does (a bias is
enough), and every page the layers ever touched stays resident with it, so the packed
codes would go on costing their bytes after the fast kernels have unpacked and dropped
them (see `qdiff.kernels.int8_weight`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qdiff.checksums import sha256_file

from .format import WEIGHTS_FILE, ExportFormatError

__all__ = ["check_state", "load_weights", "save_weights", "sha256_file"]

_HEADER_LEN_BYTES = 8  # safetensors: u64 little-endian header length, JSON header, data


def save_weights(state: Mapping[str, torch.Tensor], folder: Path) -> str:
    """Write `state` as `folder/WEIGHTS_FILE`; return the file's SHA-256."""
    path = folder / WEIGHTS_FILE
    save_file({key: t.detach().cpu().contiguous() for key, t in state.items()}, str(path),
              metadata={"format": "pt"})
    return sha256_file(path)


def _check_complete(path: Path) -> None:
    """Header parses and the file holds exactly the bytes the header describes."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(_HEADER_LEN_BYTES)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == _HEADER_LEN_BYTES else -1
        if header_len < 0 or _HEADER_LEN_BYTES + header_len > size:
            raise ExportFormatError(f"{path}: truncated ({size} bytes, shorter than its own header); "
                                    f"the export was interrupted or the file was cut. Re-export.")
        try:
            header = json.loads(handle.read(header_len))
            data_end = max((entry["data_offsets"][1] for key, entry in header.items()
                            if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ExportFormatError(f"{path}: damaged header ({error}); re-export.") from None
    expected = _HEADER_LEN_BYTES + header_len + data_end
    if size < expected:
        raise ExportFormatError(f"{path}: truncated ({size} of {expected} bytes); the export was "
                                f"interrupted or the file was cut. Re-export.")
    if size > expected:
        raise ExportFormatError(f"{path}: {size - expected} unexpected bytes after the tensor data; "
                                f"the file was modified after export.")


def load_weights(folder: Path, sha256: str) -> dict[str, torch.Tensor]:
    """Read `folder/WEIGHTS_FILE` after checking that it is complete and unmodified."""
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ExportFormatError(f"{path}: missing; the export folder is incomplete. Re-export.")
    _check_complete(path)
    actual = sha256_file(path)
    if actual != sha256:
        raise ExportFormatError(f"{path}: checksum mismatch (SHA-256 {actual[:12]}..., config.json "
                                f"records {str(sha256)[:12]}...); the file was modified after export.")
    return _owned_copy(path)


def _owned_copy(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file, copied out of the memory map one at a time (see above)."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key).clone() for key in handle.keys()}


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                path: Path) -> None:
    """Every expected tensor present, no stranger, shapes equal, integer dtypes exact."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ExportFormatError(f"{path}: tensor '{missing[0]}' is missing"
                                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                f"the export is incomplete. Re-export.")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ExportFormatError(f"{path}: unexpected tensor '{unexpected[0]}' that the model "
                                f"does not have; the file does not belong to this config.json.")
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape:
            raise ExportFormatError(f"{path}: tensor '{key}' has shape {tuple(got.shape)}, the "
                                    f"model needs {tuple(want.shape)}.")
        integer = not (got.is_floating_point() and want.is_floating_point())
        if integer and got.dtype != want.dtype:  # float tensors may come in another float dtype
            raise ExportFormatError(f"{path}: tensor '{key}' is {got.dtype}, the model needs "
                                    f"{want.dtype}.")
