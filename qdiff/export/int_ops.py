"""The reference path's integer arithmetic: sum_k (a_k - za)(w_k - zw) computed exactly.

It is the yardstick the kernels of `qdiff.kernels` are checked against, so it shares no
code with them (the layers pass the int8 shifts, `qdiff.kernels.int8_offset`).

Linear layers use PyTorch's int8 x int8 -> int32 matmul (`torch._int_mm`, CPU and CUDA).
b-bit codes are shifted by `offset = qmin + 2**(b-1)` into int8, and the zero points
are folded in afterwards, as integer-only kernels do (gemmlowp):

    sum (ua - za')(uw - zw') = ua.uw - zw' sum(ua) - za' sum(uw) + K za' zw'

so every bit-width up to 8, symmetric or not, runs on the same int8 kernel. PyTorch has
no integer convolution; convolutions run on the zero-point-centred codes in a float
type that holds every partial sum exactly, and round the result. On CPU that is float32
when K * max|a| * max|w| < 2**24 (4-bit codes: almost always), else float64, whose 2**53
covers any layer; on other devices always float64, whose rounding at the end also
removes the ~1e-16 relative error of transform-based algorithms (Winograd, FFT) or
TF32 that a GPU library may pick for float32.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F


# CUDA's int8 kernel needs more than 16 rows and inner / output sizes in multiples of 8;
# zero padding (sliced off afterwards) meets that without changing the sums.
_MIN_ROWS, _ALIGN = 17, 8
_FLOAT32_EXACT = 2**24  # float32 holds every integer up to this exactly


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] >= size:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, size - t.shape[dim]]
    return F.pad(t, pad)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32, exact."""
    m, k = a.shape
    n = b.shape[1]
    rows, inner = max(m, _MIN_ROWS), -(-k // _ALIGN) * _ALIGN
    cols = -(-n // _ALIGN) * _ALIGN
    a = _pad_to(_pad_to(a, 0, rows), 1, inner)
    b = _pad_to(_pad_to(b, 0, inner), 1, cols)
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


def int_linear(a_codes: torch.Tensor, a_zero: torch.Tensor, a_offset: int,
               w_codes: torch.Tensor, w_zero: torch.Tensor, w_offset: int) -> torch.Tensor:
    """Exact sum_k (a[m,k] - a_zero[m]) (w[n,k] - w_zero[n]) as int64, shape (M, N).

    `a_codes` (M, K) integer-valued (any dtype), `a_zero` (M,) one zero point per row;
    `w_codes` (N, K) int16 codes, `w_zero` (N,) integer zero points.
    """
    ua = (a_codes.to(torch.int16) - a_offset).to(torch.int8)
    uw = (w_codes - w_offset).to(torch.int8)
    za = a_zero.to(torch.int64) - a_offset
    zw = w_zero.to(torch.int64) - w_offset
    acc = int8_matmul(ua, uw.t()).to(torch.int64)
    acc -= zw[None, :] * ua.sum(dim=1, dtype=torch.int64)[:, None]
    acc -= za[:, None] * uw.sum(dim=1, dtype=torch.int64)[None, :]
    return acc + ua.shape[1] * za[:, None] * zw[None, :]


def exact_conv(conv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               centred_input: torch.Tensor, centred_weight: torch.Tensor) -> torch.Tensor:
    """`conv(input, weight)` of integer-valued tensors, exactly, as an integer-valued float tensor."""
    dtype = torch.float64
    if centred_input.device.type == "cpu":
        bound = (centred_weight[0].numel() * float(centred_input.abs().amax())
                 * float(centred_weight.abs().amax()))
        dtype = torch.float32 if bound < _FLOAT32_EXACT else torch.float64
    return conv(centred_input.to(dtype), centred_weight.to(dtype)).round()
