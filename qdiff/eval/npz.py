"""ADM's `.npz` formats, so that published samples and reference batches compare with ours.

- samples: `arr_0` uint8 (N, H, W, C), optional `arr_1` int64 labels (N,)
- reference batch: the samples plus precomputed `mu`, `sigma` (pool) and `mu_s`,
  `sigma_s` (spatial), as in ADM's VIRTUAL_imagenet256_labeled.npz

Files are read with `allow_pickle=False`: an object array is refused, not executed. A file
that is not a readable batch (truncated, not a zip, wrong dtype or shape) raises `NpzError`,
naming the file.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from qdiff.errors import QdiffError

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
LAYOUT = "arr_0: uint8 images (N, H, W, C), optional arr_1: N integer labels"
# what np.load and reading a member raise for a damaged or foreign file
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


class NpzError(QdiffError, ValueError):
    """A file is not a readable ADM .npz batch; the message names it and what is wrong."""

    reason: str = ""  # what is wrong, without the file's name and the fix


def _unreadable(path: str | Path, reason: str) -> NpzError:
    error = NpzError(f"{path} is not a readable ADM .npz ({reason}); give a file written by "
                     f"np.savez with {LAYOUT}.")
    error.reason = reason
    return error


@contextmanager
def _open_npz(path: str | Path) -> Iterator[np.lib.npyio.NpzFile]:
    """The open archive; any failure to read it or its members becomes an NpzError."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise _unreadable(path, "a single .npy array, not an archive of arrays")
        with data:
            yield data
    except FileNotFoundError:
        raise
    except _READ_ERRORS as error:
        if isinstance(error, NpzError):
            raise
        raise _unreadable(path, _reason(error)) from None


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "pickled" in text:  # np.load's guess for a file that is neither .npz nor .npy
        return "neither a zip archive of arrays nor a .npy array"
    return text


def _check_samples(path: str | Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
        raise _unreadable(path, f"arr_0 is {images.dtype} {images.shape}, not uint8 "
                                f"(N, H, W, C) with N >= 1")
    if labels is not None and (labels.shape != (len(images),)
                               or not np.issubdtype(labels.dtype, np.integer)):
        raise _unreadable(path, f"arr_1 is {labels.dtype} {labels.shape}, not {len(images)} "
                                f"integer labels")


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> (N, H, W, C) uint8, rounding as PIL does."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_nhwc(array: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) floats in [0, 1]."""
    if array.dtype != np.uint8 or array.ndim != 4:
        raise ValueError(f"expected uint8 images of shape (N, H, W, C), got {array.dtype} "
                         f"{array.shape}.")
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


def save_samples(path: str | Path, images: np.ndarray, labels: Optional[np.ndarray] = None,
                 **stats: np.ndarray) -> None:
    """Write an ADM sample (or reference) batch atomically: a partial file never appears."""
    path = Path(path)
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
    arrays.update(stats)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, **arrays)
    os.replace(temporary, path)


def load_samples(path: str | Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """`arr_0` images and `arr_1` labels (None when the file has no labels)."""
    with _open_npz(path) as data:
        if "arr_0" not in data:
            raise NpzError(f"{path} has no 'arr_0': not an ADM sample batch "
                           f"(keys: {sorted(data.keys())}).")
        images, labels = data["arr_0"], data["arr_1"] if "arr_1" in data else None
    _check_samples(path, images, labels)
    return images, labels


def load_reference_stats(path: str | Path) -> Optional[dict[str, np.ndarray]]:
    """The precomputed statistics of an ADM reference batch, or None if it has none."""
    with _open_npz(path) as data:
        present = [key for key in STAT_KEYS if key in data]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            raise NpzError(f"{path} holds {present} but a reference batch needs all of "
                           f"{list(STAT_KEYS)}.")
        stats = {key: data[key] for key in STAT_KEYS}
    for mean, covariance in (("mu", "sigma"), ("mu_s", "sigma_s")):
        _check_statistics(path, mean, stats[mean], covariance, stats[covariance])
    return {key: value.astype(np.float64) for key, value in stats.items()}


def _check_statistics(path: str | Path, mean_key: str, mean: np.ndarray, cov_key: str,
                      covariance: np.ndarray) -> None:
    """A mean (D,) and a covariance (D, D) of finite numbers."""
    size = mean.shape[0] if mean.ndim == 1 else -1
    if (size < 1 or covariance.shape != (size, size)
            or not all(np.issubdtype(a.dtype, np.number) and np.isfinite(a).all()
                       for a in (mean, covariance))):
        raise _unreadable(path, f"{mean_key} {mean.dtype} {mean.shape} and {cov_key} "
                                f"{covariance.dtype} {covariance.shape} are not a finite mean "
                                f"(D,) and covariance (D, D)")
