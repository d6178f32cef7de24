"""Activation codes in one pass over the input: the quantize chain compiled into one loop.

    operand = (clamp(zp + x / s, qmin, qmax) rounded - shift).to(int8 or uint8)

Eager PyTorch runs this chain (`grid_codes`, the shift to the operand's range, the
conversion) as four or five passes, each reading and writing the whole activation; on a
large layer they cost about as much as the integer sum itself. Inductor compiles the
chain into one loop. With `emulate_precision_casts` it rounds to the input's dtype after
every op as eager mode does, so the codes are the same integers in float32 and bfloat16
(the tests check them against the eager chain, at rounding ties included).

A compiled call has a fixed cost of tens of microseconds (guards, the wrapper), more than
the eager chain on small activations, so it runs from `MIN_ELEMENTS` elements up. It needs
a C++ compiler (on CPU) at the first call of each operand form; where inductor cannot
compile, the eager chain runs from then on, after one warning. Under an enclosing `torch.compile` the eager chain
is traced and fused by that compilation.
"""

from __future__ import annotations

import logging
import types
from typing import Callable, Union

import torch

from qdiff.quant.primitives import grid_codes

logger = logging.getLogger(__name__)

MIN_ELEMENTS = 1 << 14
Shift = Union[int, torch.Tensor]


def _chain(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
           shift: Shift, dtype: torch.dtype, layout: torch.memory_format) -> torch.Tensor:
    """The eager chain: the reference's codes, minus `shift`, as `dtype` (exact integers)."""
    codes = grid_codes(x, scale, zero_point, qmin, qmax)
    codes = codes if isinstance(shift, int) and shift == 0 else codes.sub_(shift)
    return codes.to(dtype, memory_format=layout)


def _signature(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
               shift: Shift, dtype: torch.dtype, layout: torch.memory_format) -> tuple:
    """What a compiled chain specialises on (all but the sizes, which stay dynamic)."""
    def form(t: Shift) -> tuple:
        return (t.dim(), t.dtype) if isinstance(t, torch.Tensor) else (t,)
    return x.dim(), x.dtype, form(scale), form(zero_point), qmin, qmax, form(shift), dtype, layout


class _Compiled:
    """The chain compiled once per operand signature, each from its own copy of `_chain`'s
    code (dynamo keeps its graphs per code object: no signature evicts another or meets the
    recompile limit); eager for good once compiling failed."""

    def __init__(self) -> None:
        self.fns: dict[tuple, Callable] = {}
        self.failed = False

    def __call__(self, *args) -> torch.Tensor:
        key = _signature(*args)
        fn = self.fns.get(key)
        if fn is None:
            copy = types.FunctionType(_chain.__code__.replace(), _chain.__globals__, _chain.__name__)
            fn = self.fns[key] = torch.compile(copy, dynamic=True, fullgraph=True,
                                               options={"emulate_precision_casts": True})
        try:
            return fn(*args)
        except Exception as error:  # no C++ compiler, an inductor limitation: eager from now on
            self.failed = True
            logger.warning("qdiff: activation codes run unfused (torch.compile failed: %s)",
                           str(error).splitlines()[0] if str(error) else type(error).__name__)
            return _chain(*args)


_COMPILED = _Compiled()


def operand_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  shift: Shift, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """The reference path's codes of `x` (`grid_codes`) minus `shift`, as `dtype`.

    Args:
        x: The layer's input (float32 or bfloat16; the chain runs in its dtype).
        scale: Step sizes broadcasting against `x`.
        zero_point: Integer zero points broadcasting against `x`.
        qmin: Smallest code.
        qmax: Largest code.
        shift: Subtracted from the codes (an int, or zero points broadcasting against `x`)
            so that they fit `dtype`.
        dtype: torch.int8 or torch.uint8.
        channels_last: Lay a convolution's (B, C, *spatial) operand out channels-last, as
            oneDNN's convolution and `im2col` read it (written so in the same pass).

    Returns:
        The operand, shaped like `x`.
    """
    layout = _layout(x, channels_last)
    if x.numel() >= MIN_ELEMENTS and not _COMPILED.failed and not torch.compiler.is_compiling():
        return _COMPILED(x, scale, zero_point, qmin, qmax, shift, dtype, layout)
    return _chain(x, scale, zero_point, qmin, qmax, shift, dtype, layout)


def _layout(x: torch.Tensor, channels_last: bool) -> torch.memory_format:
    if not channels_last:
        return torch.contiguous_format
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim(), torch.contiguous_format)
