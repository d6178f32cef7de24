"""Split activation quantization: one quantizer per channel slice of a concatenated input.

A UNet up-block resnet takes `cat(decoder features, encoder skip)` along channels, and
the two parts have different ranges: one per-tensor step size spends the 4-bit grid on
the wider part and rounds the other to a few levels (Q-Diffusion's "shortcut
splitting"). Here each slice gets its own quantizer (its own per-timestep table).
Conv and Linear are linear in their input channels, so the export computes the layer as
a sum of one integer layer per slice, exactly (`qdiff.export.split_layer`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class SplitActQuantizer(nn.Module):
    """Quantizes the input in consecutive channel slices of `widths`, each with its own quantizer."""

    def __init__(self, parts: Sequence[nn.Module], widths: Sequence[int], channel_dim: int) -> None:
        super().__init__()
        if len(parts) != len(widths) or len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"SplitActQuantizer needs one quantizer per slice and at least two "
                             f"positive slice widths, got {len(parts)} quantizers for {list(widths)}.")
        self.parts = nn.ModuleList(parts)
        self.widths = tuple(int(width) for width in widths)
        self.channel_dim = channel_dim

    @property
    def symmetric(self) -> bool:
        return self.parts[0].symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.channel_dim] != sum(self.widths):
            raise ValueError(f"SplitActQuantizer: the input has {x.shape[self.channel_dim]} channels "
                             f"(dim {self.channel_dim}), the slices {list(self.widths)} add up to "
                             f"{sum(self.widths)}.")
        slices = torch.split(x, self.widths, dim=self.channel_dim)
        return torch.cat([part(piece) for part, piece in zip(self.parts, slices)], dim=self.channel_dim)

    def extra_repr(self) -> str:
        return f"widths={list(self.widths)}, channel_dim={self.channel_dim}"
