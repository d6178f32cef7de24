"""An integer layer whose input was quantized in channel slices: one integer layer per slice.

    y = sum_j s_a,j(t) * s_w[o] * sum_{k in slice j} (a_k - za_j)(w_ok - zw_o) + bias[o]

Each slice has its own activation table (the student's `SplitActQuantizer`), so the
integer sum cannot run over all channels at once; but a Linear or (ungrouped) Conv is a
sum over its input channels, so slicing its weight along them and adding the slices'
outputs is the same layer. Each part is an ordinary `IntLayer` (packed codes, every
kernel); the per-output-channel weight grid is shared, the bias is added once. A Linear
whose input is rotated rotates the whole input first, then slices it (the parts do not
rotate): that is the student's order, rotation before quantization.

A concatenated input whose parts have their own tables (`SplitActQuantizer`) exports
this way. Format version 4 stored per-token activations quantized in channel groups
(`quant.act_group_size`) this way too, one slice per group, each with a copy of the
layer's table; those files still load (version 5 stores them as one layer).
"""

from __future__ import annotations

import torch
from torch import nn

from qdiff.quant.rotation import HadamardRotation

from .act_codes import ActCodesModule
from .format import LayerSpec
from .int_layers import INT_LAYERS, IntLayer


class SplitIntLayer(nn.Module):
    """`parts[j]` computes the layer on input channels of slice j; the output is their sum."""

    def __init__(self, spec: LayerSpec, parts: list[IntLayer]) -> None:
        super().__init__()
        self.spec = spec
        self.parts = nn.ModuleList(parts)
        self.channel_dim = -1 if spec.type == "Linear" else 1
        self.input_rotation = (HadamardRotation(spec.weight_shape[1])
                               if spec.input_rotation == "hadamard" else None)

    @classmethod
    def like(cls, module: nn.Module, spec: LayerSpec, acts: list[ActCodesModule]) -> "SplitIntLayer":
        """Empty parts shaped after `module` (bias on the first part only)."""
        if getattr(module, "groups", 1) != 1:
            raise ValueError(f"A grouped {spec.type} cannot be split by input channels.")
        int_cls = INT_LAYERS[spec.type]
        parts = [int_cls.like(module, spec.part(width), act) for width, act in zip(spec.act_split, acts)]
        for part in parts[1:]:
            part.bias = None
        return cls(spec, parts)

    @torch.no_grad()
    def set_weight(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store the whole layer's codes: each part takes its input channels' columns."""
        for part, columns in zip(self.parts, torch.split(codes, list(self.spec.act_split), dim=1)):
            part.set_weight(columns.contiguous(), scale, zero_point)

    @property
    def qweight(self) -> torch.Tensor:
        """The first part's packed codes: PEFT's handle on the layer's device (`export.lora`)."""
        return self.parts[0].qweight

    def slices(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`x` cut along its channels into the parts' inputs."""
        return torch.split(x, list(self.spec.act_split), dim=self.channel_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        slices = self.slices(x)
        y = self.parts[0](slices[0])
        for part, piece in zip(self.parts[1:], slices[1:]):
            y = y + part(piece)
        return y

    def extra_repr(self) -> str:
        rotated = ", input rotated" if self.input_rotation is not None else ""
        return f"act_split={list(self.spec.act_split)}{rotated}"
