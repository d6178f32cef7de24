"""Per-output-channel weight quantizer with a learned step size (LSQ, optionally LSQ+)."""

from __future__ import annotations

import torch
from torch import nn

from .primitives import (fake_quantize, grad_scale, grid_codes, grid_codes_and_clipped,
                         init_scale, int_range, lsq_gradient_factor)


class LSQWeightQuantizer(nn.Module):
    """Fake-quantizes a weight of shape (out, ...) with one step size per output channel.

    Works for Linear (out, in), Conv2d (out, in, kh, kw) and Conv3d weights alike: the
    channel is always dim 0. The zero point is a learned parameter only with LSQ+
    (`learn_zero_point`) on an asymmetric grid; otherwise it is a fixed buffer (all zeros
    when symmetric), so export always finds `scale` and `zero_point` under the same keys.
    """

    def __init__(self, out_channels: int, bits: int, symmetric: bool = False,
                 learn_zero_point: bool = False, lsq_grad_scale: bool = True) -> None:
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.use_grad_scale = lsq_grad_scale
        self.scale = nn.Parameter(torch.ones(out_channels))
        zero_point = torch.zeros(out_channels)
        if learn_zero_point and not symmetric:
            self.zero_point = nn.Parameter(zero_point)
        else:
            self.register_buffer("zero_point", zero_point)

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

    def _params(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale, zero_point = self._params(weight)
        return fake_quantize(weight, scale, zero_point, self.qmin, self.qmax)

    @torch.no_grad()
    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of `weight` on this quantizer's grid (int16, values in [qmin, qmax])."""
        scale, zero_point = self._params(weight)
        return grid_codes(weight, scale, zero_point.round(), self.qmin, self.qmax).to(torch.int16)

    @torch.no_grad()
    def quantize_and_clipped(self, weight: torch.Tensor, overwrite: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward`'s value, its codes (`code_dtype`) and True where its backward passes no
        gradient to `weight` (on or past an end code). `overwrite`: `weight` is a temporary
        it may compute in."""
        scale, zero_point = self._params(weight)
        zero_point = zero_point.round()
        codes, clipped = grid_codes_and_clipped(weight, scale, zero_point, self.qmin, self.qmax,
                                                overwrite)
        small_codes = codes.to(self.code_dtype)
        return codes.sub_(zero_point).mul_(scale), small_codes, clipped

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The value `quantize_and_clipped` gave with these `codes`, bit for bit (`dtype`: the
        float dtype that value had)."""
        scale, zero_point = self._params(codes)
        return codes.to(dtype).sub_(zero_point.round()).mul_(scale)

    @property
    def code_dtype(self) -> torch.dtype:
        """The smallest integer dtype that holds every code of the grid (a byte up to 8 bits)."""
        return next(dtype for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32)
                    if torch.iinfo(dtype).min <= self.qmin and self.qmax <= torch.iinfo(dtype).max)

    @torch.no_grad()
    def clipped(self, weight: torch.Tensor) -> torch.Tensor:
        """True where `forward`'s backward passes no gradient to `weight`."""
        scale, zero_point = self._params(weight)
        return grid_codes_and_clipped(weight, scale, zero_point.round(), self.qmin, self.qmax)[1]

    def trains(self) -> bool:
        """Whether a step size or zero point takes gradients."""
        return any(param.requires_grad for param in self.parameters())

    def mean_step(self) -> float:
        """Mean step size: the scale-aware LoRA learning rate is proportional to it."""
        return float(self.scale.detach().abs().mean())
