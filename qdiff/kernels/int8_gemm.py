"""The "int8" kernel: exact sums on PyTorch's int8 x int8 -> int32 matmul (`torch._int_mm`).

With `u` the activation operand (M, K) and `w'` the weight matrix (N, K) of `Int8Weight`,
`za'` the activations' residual zero point per row and `zw'` the weights' per channel:

    sum_k (u - za')(w' - zw') = u . w'  -  za' (sum_k w' - K zw')  -  zw' sum_k u

The matmul runs on `torch._int_mm` (CPU and CUDA); both corrections are rank-1 updates
in int32, skipped when the operand is centred (za' or zw' zero), which W4A4 and W4A8
weights always are. int32 arithmetic wraps, so intermediate overflow cancels and the
result is exact whenever the true sum fits: `int8_fits` checks that bound per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .base import Kernel
from .int8_weight import Int8Weight
from .registry import register_kernel

# CUDA's int8 kernel wants more than 16 rows and inner / output sizes in multiples of 8;
# CPU's (oneDNN) takes any shape. Zero rows and columns, sliced off after, change no sum.
_CUDA_MIN_ROWS, _CUDA_ALIGN = 17, 8


def _padded(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(t, (0, cols - t.shape[1], 0, rows - t.shape[0]))


def int8_mm(a: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (N, K) int8 transposed -> (M, N) int32, on any device `_int_mm` supports."""
    if a.device.type != "cuda":
        return torch._int_mm(a, matrix.t())  # a column-major right operand is oneDNN's fast case
    m, k = a.shape
    n = matrix.shape[0]
    rows = max(m, _CUDA_MIN_ROWS)
    inner, cols = (-(-size // _CUDA_ALIGN) * _CUDA_ALIGN for size in (k, n))
    if (rows, inner, cols) == (m, k, n):
        return torch._int_mm(a, matrix.t())
    out = torch._int_mm(_padded(a, rows, inner), _padded(matrix, cols, inner).t())
    return out[:m, :n]


def int8_sum(a: torch.Tensor, a_zero: Optional[torch.Tensor], weight: Int8Weight) -> torch.Tensor:
    """Exact sum_k (a - za')(w' - zw') as (M, N) int32; `a_zero` (M,) int32 or None."""
    acc = int8_mm(a, weight.matrix)
    if a_zero is not None:
        acc.addr_(a_zero, weight.col_term, alpha=-1)
    if not weight.centred:
        acc.addr_(a.sum(dim=1, dtype=torch.int32), weight.zero_shift, alpha=-1)
    return acc


@register_kernel("int8")
class Int8Kernel(Kernel):
    """`torch._int_mm` on the int8 operands (convolutions through int8 patches); fast where
    the CPU has VNNI, and on CUDA."""

    auto_candidate = True

    def linear(self, a: torch.Tensor, a_zero: Optional[torch.Tensor], weight: Int8Weight,
               levels: int) -> torch.Tensor:
        return int8_sum(a, a_zero, weight)
