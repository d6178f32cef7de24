"""The "float" kernel: the integer sums in floating point, exact by construction.

The same sum as `int8_gemm.int8_sum`, on the same int8 operands converted to float32
when every partial sum stays below 2**24 (float32 then adds integers exactly) on CPU,
else float64 (2**53: any layer). On other devices float64 always: a GPU library may pick
TF32 or transform-based algorithms (Winograd, FFT) for float32, whose small errors the
float64 result's rounding removes. Convolutions run as a float convolution on the
centred codes, rounded, so every convolution (grouped, any padding mode) has a kernel.

It gives the exact sum for every operand, so it is the fallback where another kernel
cannot (see `registry.candidates`), and what "auto" weighs the integer kernel against
(tiny shapes, or a device without a fast int8 kernel).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .base import ConvLayer, Kernel
from .int8_acts import Int8Acts
from .int8_weight import Int8Weight, from_rows
from .registry import register_kernel

_FLOAT32_EXACT = 2**24


def exact_float_dtype(inner: int, levels: int, weight: Int8Weight, device: torch.device) -> torch.dtype:
    """float32 where it sums these integers exactly (CPU, partial sums < 2**24), else float64."""
    if device.type == "cpu" and inner * levels * weight.max_abs < _FLOAT32_EXACT:
        return torch.float32
    return torch.float64


def centred_float(codes: torch.Tensor, zero: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """int8 codes minus their residual zero point (broadcast), as `dtype`."""
    values = codes.to(dtype)
    return values if zero is None else values.sub_(zero.to(dtype))


def centred_weight(weight: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """The matrix minus its residual zero points, (N, K), as `dtype`."""
    values = weight.matrix.to(dtype)
    return values if weight.centred else values.sub_(weight.zero_shift[:, None].to(dtype))


def float_sum(a: torch.Tensor, a_zero: Optional[torch.Tensor], weight: Int8Weight,
              dtype: torch.dtype) -> torch.Tensor:
    """The same sum as `int8_sum`, as an integer-valued `dtype` tensor (exact: see above)."""
    zero = None if a_zero is None else a_zero[:, None]
    return F.linear(centred_float(a, zero, dtype), centred_weight(weight, dtype))


@register_kernel("float")
class FloatKernel(Kernel):
    """The exact float sum (float32 where exact, else float64); supports every operand."""

    def supports(self, weight: Int8Weight, levels: int, zero: Optional[torch.Tensor],
                 conv: Optional[ConvLayer] = None) -> bool:
        return True

    def linear(self, a: torch.Tensor, a_zero: Optional[torch.Tensor], weight: Int8Weight,
               levels: int) -> torch.Tensor:
        return float_sum(a, a_zero, weight, exact_float_dtype(a.shape[1], levels, weight, a.device))

    def conv(self, layer: ConvLayer, acts: Int8Acts, dtype: torch.dtype) -> torch.Tensor:
        weight = layer.int8_weight()
        sum_dtype = exact_float_dtype(weight.shape[1], acts.levels, weight, acts.codes.device)
        matrix = from_rows(centred_weight(weight, sum_dtype), layer.weight_shape)
        return layer._conv(centred_float(acts.codes, acts.zero, sum_dtype), matrix).round_().to(dtype)
