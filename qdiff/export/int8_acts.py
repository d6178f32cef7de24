"""Activations -> int8 operands for the fast kernels, with the reference path's exact codes.

The codes are computed with the arithmetic of `act_codes` (`x / s + zp`, clamp, round,
in `x`'s dtype), so the fast and the reference path see the same integers; only what
happens after the rounding differs, and that is exact integer arithmetic:

- centred (act bits <= 7 and zero points on the grid): `code - zp` lies in [-127, 127]
  and is the operand itself; no activation zero-point term remains;
- otherwise (8-bit asymmetric): `code - offset` in int8 and the residual zero point
  `zp - offset` per row, for the correction of `int8_gemm`.

PyTorch fuses no such chain in eager mode; the chain runs in place on one temporary
(one allocation, five passes), and `torch.compile` fuses it into one pass.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .act_codes import ActCodesModule, TimestepActCodes
from .int_ops import int8_offset


class Int8Acts(NamedTuple):
    """`codes` int8 shaped like the input; `zero` the residual zero point (int32, shaped like
    `scale`) or None when centred; `scale` the step size (broadcasts against the input)."""

    codes: torch.Tensor
    zero: Optional[torch.Tensor]
    scale: torch.Tensor


def centres_codes(act: ActCodesModule) -> bool:
    """Whether `code - zp` fits int8 for every grid the module can produce."""
    if act.qmax - act.qmin > 127:
        return False
    if isinstance(act, TimestepActCodes):  # a table entry off the grid would not fit
        return bool(((act.zero_point >= act.qmin) & (act.zero_point <= act.qmax)).all())
    return True  # per-token zero points are derived inside [qmin, qmax]


def int8_acts(act: ActCodesModule, x: torch.Tensor, centred: bool) -> Int8Acts:
    """Quantize `x` on `act`'s grid into int8 operands (see the module docstring)."""
    scale, zero_point = act.grid(x)
    codes = torch.div(x, scale)
    codes.add_(zero_point).clamp_(act.qmin, act.qmax).round_()
    if centred:
        return Int8Acts(codes.sub_(zero_point).to(torch.int8), None, scale)
    offset = int8_offset(act.bits, act.qmin)
    zero = (zero_point - offset).to(torch.int32)
    return Int8Acts(codes.sub_(offset).to(torch.int8), zero, scale)
