"""Per-output-channel weight quantizer with a learned step size (LSQ, optionally LSQ+):
`quant.weight_mode: per_channel`, the default."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .primitives import grad_scale, init_scale, lsq_gradient_factor
from .weight_quantizer import WeightQuantizer, register_weight_quantizer

if TYPE_CHECKING:
    from qdiff.config import QuantConfig


@register_weight_quantizer("per_channel")
class LSQWeightQuantizer(WeightQuantizer):
    """Fake-quantizes a weight of shape (out, ...) with one step size per output channel.

    Works for Linear (out, in), Conv2d (out, in, kh, kw) and Conv3d weights alike: the
    channel is always dim 0. The zero point is a learned parameter only with LSQ+
    (`learn_zero_point`) on an asymmetric grid; otherwise it is a fixed buffer (all zeros
    when symmetric), so export always finds `scale` and `zero_point` under the same keys.
    """

    def __init__(self, out_channels: int, bits: int, *, symmetric: bool = False,
                 learn_zero_point: bool = False, lsq_grad_scale: bool = True) -> None:
        super().__init__(bits=bits, symmetric=symmetric)
        self.use_grad_scale = lsq_grad_scale
        self.scale = nn.Parameter(torch.ones(out_channels))
        zero_point = torch.zeros(out_channels)
        if learn_zero_point and not symmetric:
            self.zero_point = nn.Parameter(zero_point)
        else:
            self.register_buffer("zero_point", zero_point)

    @classmethod
    def from_config(cls, cfg: "QuantConfig", *, out_channels: int, bits: int) -> "LSQWeightQuantizer":
        return cls(out_channels, bits, symmetric=cfg.weight_symmetric,
                   learn_zero_point=cfg.learn_zero_point, lsq_grad_scale=cfg.lsq_grad_scale)

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, channels={self.scale.numel()}"

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor, method: str = "mse", p: float = 2.4) -> None:
        """Set every channel's step size (and zero point) from `weight` by min-max or Lp search."""
        scale, zero_point = init_scale(weight, self.qmin, self.qmax, self.symmetric, method, p,
                                       channel_dim=0)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)

    def grid(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step size and zero point shaped to broadcast against `weight`."""
        shape = (-1,) + (1,) * (weight.dim() - 1)
        scale, zero_point = self.scale, self.zero_point
        if self.use_grad_scale:
            g = lsq_gradient_factor(weight[0].numel(), self.qmax)
            scale = grad_scale(scale, g)
            if isinstance(zero_point, nn.Parameter):
                zero_point = grad_scale(zero_point, g)
        # A step size pushed below zero by an update would flip the grid; keep it positive.
        return scale.clamp_min(1e-8).view(shape), zero_point.view(shape)

    def export_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.scale.detach().float().clamp_min(1e-8),
                self.zero_point.detach().float().round())

    def mean_step(self) -> float:
        return float(self.scale.detach().abs().mean())
