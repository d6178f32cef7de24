"""The `Kernel` protocol: one way to compute an integer layer's exact sums.

Every kernel computes the same numbers, sum_k (a - za')(w' - zw') over the operands the
layers prepare once (`Int8Weight`: the weight codes as an int8 matrix) and per call
(`Int8Acts`: the activation codes in int8 with their residual zero points), and returns
them as an integer-valued tensor (int32, or floats that hold every sum exactly). The
layer then rescales them; so a kernel is only the sum, and adding one touches no layer:

    @register_kernel("mine")
    class Mine(Kernel):
        def linear(self, a, a_zero, weight, levels):
            return ...  # (M, N) exact sums

A convolution runs as one `linear` over int8 patches (`im2col`), unless the kernel
overrides `conv`. A kernel that cannot give the exact sum for some operands says so in
`supports`; the layer then runs the fallback (the exact float sum), which supports all.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional, Protocol, Sequence, Union

import torch

from .im2col import im2col, out_size
from .int8_acts import Int8Acts
from .int8_weight import Int8Weight
from .onednn_fused import FusableLayer

_INT32_LIMIT = 2**31


class ConvLayer(Protocol):
    """What a kernel reads of a convolution layer: its geometry, its weight, its float conv."""

    weight_shape: tuple[int, ...]
    stride: Sequence[int]
    padding: Union[Sequence[int], str]
    dilation: Sequence[int]
    groups: int
    padding_mode: str

    def int8_weight(self) -> Int8Weight: ...

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor: ...


def int8_fits(inner: int, levels: int, weight: Int8Weight) -> bool:
    """Whether every sum of `inner` products |a - za'| * |w' - zw'| fits int32 (int32
    arithmetic wraps, so intermediate overflow cancels: the bound is on the result).

    Args:
        inner: The length of the sums (input features, or channels times kernel size).
        levels: The number of activation levels.
        weight: The prepared weight.

    Returns:
        True when an int32 accumulator gives the exact sums.
    """
    return inner * levels * max(weight.max_abs, 1) < _INT32_LIMIT


def patches_fit(layer: ConvLayer) -> bool:
    """Whether `im2col` lays out this convolution (one group, zero padding given as sizes)."""
    return layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


class Kernel(ABC):
    """An exact integer-sum kernel; `register_kernel` makes the one instance the layers use.

    `auto_candidate`: whether "auto" may pick it as the device's integer kernel (measured
    once per device against the other candidates, then weighed per shape against the
    fallback).
    """

    name: str = ""  # set by `register_kernel`
    auto_candidate: ClassVar[bool] = False

    def available(self, device: torch.device) -> bool:
        """Whether this PyTorch build runs the kernel on `device`."""
        return True

    def prepare(self, weight: Int8Weight) -> None:
        """Hold the weight as this kernel reads it, when a layer is set to it (default: the
        plain int8 matrix)."""
        weight.hold_plain()

    def supports(self, weight: Int8Weight, levels: int, zero: Optional[torch.Tensor],
                 conv: Optional[ConvLayer] = None) -> bool:
        """Whether the kernel gives the exact sum for these operands: activations spanning
        `levels` codes with residual zero points `zero` (per sample or row, or None),
        in a Linear or, with `conv`, a convolution. Default: the int32 bound, and
        patches `im2col` can lay out."""
        if conv is not None and not patches_fit(conv):
            return False
        return int8_fits(weight.shape[1], levels, weight)

    def encode(self, codes: torch.Tensor,
               zero: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The int8 codes as the activation operand `linear` reads, and each sample's padding
        value in that operand (None: 0). Default: both as they are (the residual zero point
        pads, as the real-valued zero it stands for)."""
        return codes, zero

    @abstractmethod
    def linear(self, a: torch.Tensor, a_zero: Optional[torch.Tensor], weight: Int8Weight,
               levels: int) -> torch.Tensor:
        """Exact sum_k (a - za')(w' - zw') as an integer-valued (M, N) tensor, for `a` (M, K)
        from `encode`, `a_zero` (M,) int32 the rows' residual zero points or None."""

    def conv(self, layer: ConvLayer, acts: Int8Acts, dtype: torch.dtype) -> torch.Tensor:
        """The convolution's sums as a (B, O, *out) `dtype` tensor: one `linear` over patches."""
        batch, _, *spatial = acts.codes.shape
        kernel = layer.weight_shape[2:]
        zero = sample_zero(acts)
        out = tuple(out_size(*args) for args in zip(spatial, kernel, layer.stride, layer.padding,
                                                    layer.dilation))
        a_zero = None if zero is None else zero[:, None].expand(batch, math.prod(out)).reshape(-1)
        codes, fill = self.encode(acts.codes, zero)  # encoded before im2col: a pass over the codes only
        patches = im2col(codes, kernel, layer.stride, layer.padding, layer.dilation, fill)
        acc = self.linear(patches, a_zero, layer.int8_weight(), acts.levels)
        y = torch.empty((batch, acc.shape[1], *out), dtype=dtype, device=acc.device)
        return y.copy_(acc.view(batch, *out, acc.shape[1]).movedim(-1, 1))

    def fuses(self, layer: FusableLayer, conv: bool) -> bool:
        """Whether `fused_forward` runs this layer (a convolution if `conv`); asked once per
        layer. Default: no, the layer runs the sum above and rescales it itself."""
        return False

    def fused_forward(self, layer: FusableLayer, x: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor],
                      conv: bool) -> torch.Tensor:
        """The layer's whole forward in this kernel's own fused ops, for a call whose batch
        shares one activation grid `(scale, zero_point)`: quantize, sum, rescale, add the
        bias; equal to the reference path up to the rescale's float rounding."""
        raise NotImplementedError(f"kernel {self.name!r} has no fused forward")

    def pack(self, matrix: torch.Tensor, conv: Optional[ConvLayer] = None) -> Any:
        """This kernel's own copy of the (N, K) int8 matrix (of convolution `conv`, if any),
        for kernels that read their own layout (see `Int8Weight.packed_for`); `unpack` gives
        the matrix back exactly."""
        raise NotImplementedError(f"kernel {self.name!r} reads the plain matrix")

    def unpack(self, packed: Any) -> torch.Tensor:
        raise NotImplementedError(f"kernel {self.name!r} reads the plain matrix")

    def __repr__(self) -> str:
        return f"<qdiff kernel {self.name!r}>"


def sample_zero(acts: Int8Acts) -> Optional[torch.Tensor]:
    """The residual zero point of each sample, (B,), or None when centred."""
    return None if acts.zero is None else acts.zero.reshape(acts.codes.shape[0])
