"""Inception-v3 as the FID/sFID/IS evaluators use it (the TF 2015-12-05 graph in PyTorch).

The FID network differs from torchvision's Inception-v3 in three details, all in the
pooling branches: average pools do not count padding (Mixed_5*, Mixed_6*, Mixed_7b), the
last block (Mixed_7c) max-pools, and the classifier has 1008 outputs. Weights are the
standard `pt_inception-2015-12-05-6726825d.pth` of pytorch-fid.

Features, for images in [0, 1] resized to 299x299:
  - pool    : 2048-d global average pool (pool3) -> FID, precision/recall
  - spatial : first 7 channels of Mixed_6d's 1x1 branch, 17x17x7 = 2023-d; this is
              `mixed_6/conv` of the TF graph, the layer ADM's evaluator uses for sFID
  - logits  : 1008-way classifier -> Inception Score
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from qdiff.eval.features import Features

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/" + FID_WEIGHTS_FILE)
SFID_CHANNELS = 7


class _FIDPooling:
    """Recompute the pooling branch the way the TF graph does (see module docstring)."""

    max_pool = False

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = super()._forward(x)  # type: ignore[misc]
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        outputs[-1] = self.branch_pool(pooled)  # type: ignore[attr-defined]
        return outputs


class FIDInceptionA(_FIDPooling, InceptionA):
    pass


class FIDInceptionC(_FIDPooling, InceptionC):
    pass


class FIDInceptionE(_FIDPooling, InceptionE):
    pass


class FIDInceptionEMaxPool(_FIDPooling, InceptionE):
    max_pool = True


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; `forward` takes (N, 1 or 3, H, W) images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = (
            FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64))
        net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (
            FIDInceptionC(768, 128), FIDInceptionC(768, 160), FIDInceptionC(768, 160),
            FIDInceptionC(768, 192))
        net.Mixed_7b, net.Mixed_7c = FIDInceptionE(1280), FIDInceptionEMaxPool(2048)
        self.net = net
        self._spatial: torch.Tensor | None = None
        net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self._spatial = output[:, :SFID_CHANNELS]

    def forward(self, images: torch.Tensor) -> Features:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        x = F.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        x = x * 2.0 - 1.0
        net = self.net
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
                     "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(net, name)(x)
        pool = net.avgpool(x).flatten(1)
        spatial, self._spatial = self._spatial.flatten(1), None
        return Features(pool=pool, spatial=spatial, logits=net.fc(pool))


def _default_weights_path() -> Path:
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return torch_home / "hub" / "checkpoints" / FID_WEIGHTS_FILE


def load_fid_inception(path: str | Path | None = None) -> FIDInceptionV3:
    """The FID Inception with its standard weights, from `path` or the torch hub cache.

    `.pth` files are read with `torch.load(weights_only=True)` (tensors only, no code);
    `.safetensors` files are read as such.
    """
    path = Path(path) if path is not None else _default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Download {FID_WEIGHTS_FILE} from "
            f"{FID_WEIGHTS_URL} and put it at {_default_weights_path()} (the torch hub cache), "
            f"or pass its path (--features PATH).")
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    model.net.load_state_dict(state)
    return model.eval()
