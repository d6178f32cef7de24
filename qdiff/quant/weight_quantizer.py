"""The weight-quantizer protocol and the registry keyed by `QuantConfig.weight_mode`.

A quantized layer fake-quantizes its weight `W0 + B @ A` with one weight quantizer; the
layer (its packed base, the low-rank backward), the model-wide helpers (`model_ops`) and
the exports (`qdiff.export.freeze`, the torchao format) ask it through this protocol
only, so a new kind of weight quantization is one new file:

    @register_weight_quantizer("my_mode")
    class MyWeightQuantizer(WeightQuantizer):
        @classmethod
        def from_config(cls, cfg, *, out_channels, bits): ...
        def init_from(self, weight, method="mse", p=2.4): ...   # step sizes from W0
        def grid(self, weight): ...       # (scale, zero_point) broadcasting against weight
        def export_params(self): ...      # (scale, zero_point), one per output channel

and `quant.weight_mode: my_mode` selects it (`QuantConfig` checks the mode against this
registry). The forward, the integer codes, the clipped mask and their dequantization
follow from `grid` (the defaults below); a quantizer may override them.

The export format stores a weight as integer codes on an affine grid per output channel:
codes in `int_range(bits, symmetric)`, one step size and one integer zero point per
output channel. A quantizer whose grid is coarser (one step for the tensor, or per
block of channels) exports by repeating its step sizes per channel; one whose values
are not on such a grid cannot be exported in this format.
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Callable, ClassVar, TypeVar

import torch
from torch import nn

from qdiff.errors import QdiffError
from qdiff.registry import ClassRegistry

from .primitives import fake_quantize, grid_codes, grid_codes_and_clipped, int_range

if TYPE_CHECKING:
    from qdiff.config import QuantConfig


class WeightQuantizer(nn.Module):
    """Base of the weight fake-quantizers (one per quantized layer; the channel is dim 0 of
    a Linear (out, in), Conv2d (out, in, kh, kw) or Conv3d weight).

    Subclasses call `super().__init__(bits=..., symmetric=...)` (which sets the integer
    range `qmin`, `qmax`) and implement `from_config`, `init_from`, `grid` and
    `export_params`; the other members have defaults that follow from `grid`.
    """

    mode: ClassVar[str] = ""  # its `quant.weight_mode`, set by `register_weight_quantizer`
    bits: int
    symmetric: bool  # the codes are signed (zero point 0) or unsigned
    qmin: int
    qmax: int

    def __init__(self, *, bits: int, symmetric: bool) -> None:
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.qmin, self.qmax = int_range(bits, symmetric)

    @classmethod
    def from_config(cls, cfg: "QuantConfig", *, out_channels: int, bits: int) -> "WeightQuantizer":
        """The quantizer of one layer's weight: its `out_channels` and `bits` (the layer's,
        after overrides); the rest comes from `cfg`. The layer then calls `init_from`."""
        raise NotImplementedError

    def init_from(self, weight: torch.Tensor, method: str = "mse", p: float = 2.4) -> None:
        """Set the grid from the layer's weight `W0` (`method`: `quant.weight_init`,
        "minmax" or "mse", the Lp search with `p` = `quant.lp_norm`)."""
        raise NotImplementedError

    def grid(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step size and zero point shaped to broadcast against `weight`, as the forward
        uses them: the step sizes positive and carrying their gradients, the zero point
        possibly unrounded (the forward rounds it straight-through, the codes round it)."""
        raise NotImplementedError

    def export_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point): float32, one per output channel, detached, the step sizes
        as the grid has them (positive) and the zero points rounded. What the export format
        stores (`weight_scale`, `weight_zero_point`), what the torchao format builds its
        int8 weights from, and what a packed base weight keeps beside its codes."""
        raise NotImplementedError

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """`weight` fake-quantized on `grid` (LSQ/LSQ+ gradients for the step sizes)."""
        scale, zero_point = self.grid(weight)
        return fake_quantize(weight, scale, zero_point, self.qmin, self.qmax)

    @torch.no_grad()
    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes of `weight` on this quantizer's grid (int16, values in [qmin, qmax])."""
        scale, zero_point = self.grid(weight)
        return grid_codes(weight, scale, zero_point.round(), self.qmin, self.qmax).to(torch.int16)

    @torch.no_grad()
    def quantize_and_clipped(self, weight: torch.Tensor, overwrite: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward`'s value, its codes (`code_dtype`) and True where its backward passes no
        gradient to `weight` (on or past an end code). `overwrite`: `weight` is a temporary
        it may compute in."""
        scale, zero_point = self.grid(weight)
        zero_point = zero_point.round()
        codes, clipped = grid_codes_and_clipped(weight, scale, zero_point, self.qmin, self.qmax,
                                                overwrite)
        small_codes = codes.to(self.code_dtype)
        return codes.sub_(zero_point).mul_(scale), small_codes, clipped

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The value `quantize_and_clipped` gave with these `codes`, bit for bit (`dtype`: the
        float dtype that value had)."""
        scale, zero_point = self.grid(codes)
        return codes.to(dtype).sub_(zero_point.round()).mul_(scale)

    @property
    def code_dtype(self) -> torch.dtype:
        """The smallest integer dtype that holds every code of the grid (a byte up to 8 bits)."""
        return next(dtype for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32)
                    if torch.iinfo(dtype).min <= self.qmin and self.qmax <= torch.iinfo(dtype).max)

    @torch.no_grad()
    def clipped(self, weight: torch.Tensor) -> torch.Tensor:
        """True where `forward`'s backward passes no gradient to `weight`."""
        scale, zero_point = self.grid(weight)
        return grid_codes_and_clipped(weight, scale, zero_point.round(), self.qmin, self.qmax)[1]

    def trains(self) -> bool:
        """Whether a step size or zero point takes gradients (the low-rank backward then
        steps aside: those need the full weight gradient)."""
        return any(param.requires_grad for param in self.parameters())

    def mean_step(self) -> float:
        """Mean step size: the scale-aware LoRA learning rate is proportional to it."""
        return float(self.export_params()[0].mean())

    @property
    def device(self) -> torch.device:
        """Where its tensors live (the layer builds the tensors it adds there)."""
        return next(chain(self.parameters(), self.buffers())).device

    def extra_repr(self) -> str:
        kind = "symmetric" if self.symmetric else "asymmetric"
        return f"mode={self.mode!r}, bits={self.bits}, {kind}"


class UnknownWeightModeError(QdiffError, ValueError):
    """A `quant.weight_mode` that no weight quantizer is registered under."""


Q = TypeVar("Q", bound=type)
_WEIGHT_QUANTIZERS = ClassRegistry("Weight mode", WeightQuantizer, "mode", key="quant.weight_mode",
                                   unknown=UnknownWeightModeError)


def register_weight_quantizer(mode: str) -> Callable[[Q], Q]:
    """Class decorator: `quant.weight_mode: mode` builds this `WeightQuantizer` subclass."""
    return _WEIGHT_QUANTIZERS.register(mode)


def unregister_weight_quantizer(mode: str) -> None:
    """Remove a registered mode (configs naming it are refused from then on)."""
    _WEIGHT_QUANTIZERS.unregister(mode)


def weight_modes() -> tuple[str, ...]:
    """The registered `quant.weight_mode` values, in registration order."""
    return tuple(_WEIGHT_QUANTIZERS)


def weight_quantizer_class(mode: str) -> type:
    """The `WeightQuantizer` subclass registered under `mode`."""
    return _WEIGHT_QUANTIZERS.lookup(mode)
