"""Exact sums of the fast kernels: int8 x int8 -> int32 matmul, or integer-valued floats.

With `u` the activation operand (M, K) and `w'` the weight matrix (N, K) of `Int8Weight`,
`za'` the activations' residual zero point per row and `zw'` the weights' per channel:

    sum_k (u - za')(w' - zw') = u . w'  -  za' (sum_k w' - K zw')  -  zw' sum_k u

The matmul runs on `torch._int_mm` (CPU and CUDA); both corrections are rank-1 updates
in int32, skipped when the operand is centred (za' or zw' zero), which W4A4 and W4A8
weights always are. int32 arithmetic wraps, so intermediate overflow cancels and the
result is exact whenever the true sum fits: `int8_fits` checks that bound per layer.

`float_sum` is the alternative a layer may measure faster (tiny shapes, or a device
without an int8 kernel): the same sum in float32 when every partial sum stays below
2**24 (then float arithmetic is exact), else in float64.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .int8_weight import Int8Weight

_INT32_LIMIT = 2**31
_FLOAT32_EXACT = 2**24
# CUDA's int8 kernel wants more than 16 rows and inner / output sizes in multiples of 8;
# CPU's (oneDNN) takes any shape. Zero rows and columns, sliced off after, change no sum.
_CUDA_MIN_ROWS, _CUDA_ALIGN = 17, 8


def int8_fits(inner: int, act_levels: int, weight: Int8Weight) -> bool:
    """Whether every sum of `inner` products |u - za'| * |w' - zw'| fits int32."""
    return inner * act_levels * max(weight.max_abs, 1) < _INT32_LIMIT


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


def exact_float_dtype(inner: int, act_levels: int, weight: Int8Weight, device: torch.device) -> torch.dtype:
    """float32 where it sums these integers exactly (CPU, partial sums < 2**24), else float64.

    On other devices float64 always: a GPU library may pick TF32 or transform-based
    algorithms for float32.
    """
    if device.type == "cpu" and inner * act_levels * weight.max_abs < _FLOAT32_EXACT:
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
