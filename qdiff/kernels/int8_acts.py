"""Activations -> int8 operands for the fast kernels, with the reference path's exact codes.

The codes are computed with the arithmetic of the export's activation modules
(`qdiff.export.act_codes`, `grid_codes`: `zp + x / s` in one rounding, clamp, round,
in `x`'s dtype), so the fast and the reference path see the same integers in every
dtype; only what happens after the rounding differs, and that is exact integer arithmetic:

- centred (act bits <= 7 and zero points on the grid): `code - zp` lies in [-127, 127]
  and is the operand itself; no activation zero-point term remains;
- otherwise (8-bit asymmetric): `code - offset` in int8 and the residual zero point
  `zp - offset` per row, for the correction of `int8_gemm`.

The chain runs as one compiled loop on large activations (`one_pass`), and the fused
oneDNN layer (`onednn_fused`) feeds the same codes to its op.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

import torch

from .int8_weight import int8_offset
from .one_pass import operand_codes


class ActGrid(Protocol):
    """An activation module's grid: `grid(x)` gives (scale, zero point) broadcasting against
    `x`; codes are `bits`-bit integers in [qmin, qmax]."""

    bits: int
    qmin: int
    qmax: int

    def grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Int8Acts(NamedTuple):
    """`codes` int8 shaped like the input; `zero` the residual zero point (int32, shaped like
    `scale`) or None when centred; `scale` the step size (broadcasts against the input);
    `levels` = qmax - qmin, which bounds |code - zp| (for the exactness bounds)."""

    codes: torch.Tensor
    zero: Optional[torch.Tensor]
    scale: torch.Tensor
    levels: int


def int8_acts(act: ActGrid, x: torch.Tensor, centred: bool) -> Int8Acts:
    """Quantize `x` on `act`'s grid into int8 operands (see the module docstring); `centred`:
    whether `code - zp` fits int8 for every grid `act` produces.

    Args:
        act: The activation grid (scale, zero point, levels) of the call.
        x: The layer's float input.
        centred: Whether to store `code - zp` rather than offset codes.

    Returns:
        The int8 operands and their zero points.
    """
    scale, zero_point = act.grid(x)
    levels = act.qmax - act.qmin
    if centred:
        codes = operand_codes(x, scale, zero_point, act.qmin, act.qmax, zero_point, torch.int8)
        return Int8Acts(codes, None, scale, levels)
    offset = int8_offset(act.bits, act.qmin)
    codes = operand_codes(x, scale, zero_point, act.qmin, act.qmax, offset, torch.int8)
    return Int8Acts(codes, (zero_point - offset).to(torch.int32), scale, levels)
