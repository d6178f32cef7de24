"""ADM's `.npz` formats, so that published samples and reference batches compare with ours.

- samples: `arr_0` uint8 (N, H, W, C), optional `arr_1` int64 labels (N,)
- reference batch: the samples plus precomputed `mu`, `sigma` (pool) and `mu_s`,
  `sigma_s` (spatial), as in ADM's VIRTUAL_imagenet256_labeled.npz

Files are read with `allow_pickle=False`: an object array is refused, not executed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


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
    with np.load(path, allow_pickle=False) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path} has no 'arr_0': not an ADM sample batch "
                             f"(keys: {sorted(data.keys())}).")
        labels = data["arr_1"] if "arr_1" in data else None
        return data["arr_0"], labels


def load_reference_stats(path: str | Path) -> Optional[dict[str, np.ndarray]]:
    """The precomputed statistics of an ADM reference batch, or None if it has none."""
    with np.load(path, allow_pickle=False) as data:
        present = [key for key in STAT_KEYS if key in data]
        if not present:
            return None
        if len(present) != len(STAT_KEYS):
            raise ValueError(f"{path} holds {present} but a reference batch needs all of "
                             f"{list(STAT_KEYS)}.")
        return {key: data[key].astype(np.float64) for key in STAT_KEYS}
