"""Pick the feature network by name: "digits" (the embedded domain), "inception", or a path."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from safetensors.torch import load_file
from torch import nn

from qdiff.eval.digits_features import DigitsFeatureNet
from qdiff.eval.inception import load_fid_inception

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
DIGITS_FEATURES_DIR = ASSETS_DIR / "digits-features"
REFERENCE_STATS_FILE = "reference_stats.safetensors"


def load_digits_reference_stats(folder: str | Path = DIGITS_FEATURES_DIR) -> dict[str, np.ndarray]:
    """mu/sigma (pooled) and mu_s/sigma_s (spatial) of the real held-out digits."""
    path = Path(folder) / REFERENCE_STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild the digits feature network with "
                                f"`python -m qdiff.models.zoo.digits --force`.")
    return {name: tensor.double().numpy() for name, tensor in load_file(path).items()}


def load_feature_net(name: str) -> tuple[nn.Module, Optional[dict[str, np.ndarray]]]:
    """The network and, when it ships them, reference statistics of real data.

    "digits": assets/digits-features (with the held-out digits' statistics);
    "inception": FID Inception-v3 from the torch hub cache;
    a folder with config.json: a digits-style feature network saved by qdiff;
    any other path: FID Inception-v3 weights (.pth or .safetensors).
    """
    if name == "digits":
        name = str(DIGITS_FEATURES_DIR)
    if name == "inception":
        return load_fid_inception(), None
    path = Path(name)
    if (path / "config.json").is_file():
        stats = load_digits_reference_stats(path) if (path / REFERENCE_STATS_FILE).is_file() else None
        return DigitsFeatureNet.from_pretrained(path).eval(), stats
    return load_fid_inception(path), None
