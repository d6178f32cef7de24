"""The digits feature network: Inception's stand-in on the embedded 32x32 digits domain.

It plays the three roles Inception-v3 plays in the ADM evaluator:
  - `pool`    : globally pooled last conv features (Inception's pool3)  -> FID, precision/recall
  - `spatial` : the first channels of an intermediate 8x8 map (Inception's mixed_6/conv,
                first 7 channels) -> sFID, which sees spatial structure that pooling hides
  - `logits`  : class scores -> Inception Score and class accuracy
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from qdiff.eval.features import Features


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class DigitsFeatureNet(ModelMixin, ConfigMixin):
    """A small VGG-style classifier of 32x32 grey digits; input in [0, 1], shape (N, 1, 32, 32)."""

    @register_to_config
    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128),
                 spatial_block: int = 1, spatial_channels: int = 4, dropout: float = 0.3):
        super().__init__()
        channels = (1, *widths)
        self.blocks = nn.ModuleList(
            _conv_block(channels[i], channels[i + 1]) for i in range(len(widths)))
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, images: torch.Tensor) -> Features:
        if images.shape[1] != 1:  # colour samples (a text-to-image family): their grey level
            images = images.mean(dim=1, keepdim=True)
        hidden = images * 2.0 - 1.0
        spatial = None
        for index, block in enumerate(self.blocks):
            hidden = block(hidden)
            if index == self.config.spatial_block:
                spatial = hidden[:, : self.config.spatial_channels].flatten(1)
        pool = hidden.mean(dim=(2, 3))
        return Features(pool=pool, spatial=spatial, logits=self.head(self.head_dropout(pool)))
