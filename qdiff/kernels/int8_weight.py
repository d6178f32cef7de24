"""Weight codes held as an int8 matrix, the right-hand operand of the fast integer kernels.

The packed bytes are what the file holds and what the reference path decodes on every
call; decoding costs more than the matmul itself, so the fast kernels decode once into
an (N, K) int8 matrix (N output channels; K in the order of the kernel's input rows:
for a convolution kernel offsets outer, input channels inner, as `im2col` lays out its
patches). int8 is 0.25x the float32 weight; the layer then drops its packed bytes and
packs them again only when a state dict is asked for (see `qdiff.export.int_layers.IntLayer`), so one copy is
held at a time. A kernel that reads its own layout (oneDNN's prepacked weights) holds
that copy instead (`packed_for`), and the plain matrix is decoded from it on demand.

Centring: a b-bit code minus its channel's zero point lies in [-(2**b - 1), 2**b - 1],
which int8 holds for b <= 7 (and for 8-bit channels whose zero point is central); the
matrix then holds `w - zw` and the sum needs no weight zero-point term. Otherwise it
holds `w - offset` (the int8 shift of `int8_offset`) and `zero_shift = zw - offset`
enters the correction of `int8_gemm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from .base import Kernel

_INT8_MIN, _INT8_MAX = -128, 127


def int8_offset(bits: int, qmin: int) -> int:
    """Shift that maps b-bit codes [qmin, qmin + 2**b - 1] into int8's [-128, 127].

    Args:
        bits: The code width b.
        qmin: The smallest code.

    Returns:
        The offset to subtract from a code.
    """
    return qmin + 2 ** (bits - 1)


def to_rows(codes: torch.Tensor) -> torch.Tensor:
    """(N, C, *kernel) weight -> (N, K) with kernel offsets outer and channels inner."""
    return codes.movedim(1, -1).reshape(codes.shape[0], -1)


def from_rows(rows: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `to_rows` for a weight of `weight_shape`, in standard strides.

    `.contiguous()` would keep a 1x1 kernel's moved strides (size-1 dimensions do not count),
    which a convolution reads as channels-last: its output would then be channels-last, and
    the next normalisation would round differently than after the reference path.
    """
    moved = (weight_shape[0], *weight_shape[2:], weight_shape[1])
    return rows.reshape(moved).movedim(-1, 1).clone(memory_format=torch.contiguous_format)


class Int8Weight(nn.Module):
    """`matrix` (N, K) int8, `zero_shift` (N,) and `col_term` (N,) int32; device moves with the layer.

    `col_term = sum_k matrix[n, k] - K * zero_shift[n]` is the weight's factor in the
    activation zero-point correction; `max_abs` bounds |w - zw| (for exact float sums).
    Buffers are not persistent: the state dict holds the packed codes, not these.
    The matrix is held plain (`plain`) or, once a kernel asked for its own layout
    (`packed_for`), as that kernel's copy only (`packed`); `matrix` then decodes it.
    """

    def __init__(self, matrix: torch.Tensor, zero_shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("plain", matrix.contiguous(), persistent=False)
        self.register_buffer("zero_shift", zero_shift.to(torch.int32), persistent=False)
        inner = matrix.shape[1]
        col_term = matrix.sum(dim=1, dtype=torch.int32) - inner * self.zero_shift
        self.register_buffer("col_term", col_term, persistent=False)
        self.shape = tuple(matrix.shape)
        self.centred = not bool(zero_shift.any())
        self.max_abs = int((matrix.int() - self.zero_shift[:, None]).abs().max())
        self.packed: Any = None  # a kernel's own copy of the matrix, held instead of `plain`
        self.packed_by: Optional["Kernel"] = None

    @property
    def matrix(self) -> torch.Tensor:
        """The (N, K) int8 matrix (a decoded temporary while a kernel's copy is what is held)."""
        return self.plain if self.plain is not None else self.packed_by.unpack(self.packed)

    def packed_for(self, kernel: "Kernel", conv: Any = None) -> Any:
        """`kernel`'s own copy (`kernel.pack`, for convolution `conv` if given), made on first
        use; the plain matrix is then dropped."""
        if self.packed_by is not kernel:
            self.hold_plain()
            self.packed, self.packed_by = kernel.pack(self.plain, conv), kernel
            self.plain = None
        return self.packed

    def hold_plain(self) -> None:
        """Hold the plain matrix again (for kernels that read it, or a device move)."""
        if self.packed_by is not None:
            self.plain, self.packed, self.packed_by = self.matrix.contiguous(), None, None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.packed_by is not None:  # a kernel's copy may have no storage to copy: copies get the plain matrix
            state["_buffers"] = {**state["_buffers"], "plain": self.matrix.contiguous()}
            state["packed"] = state["packed_by"] = None
        return state

    def _apply(self, fn, recurse: bool = True):
        self.hold_plain()  # moves and casts act on the plain matrix (a kernel's copy may be CPU-only)
        return super()._apply(fn, recurse)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, zero_point: torch.Tensor, bits: int, qmin: int) -> "Int8Weight":
        """From integer codes shaped like the weight and the per-channel zero points."""
        rows = to_rows(codes.to(torch.int16))
        zero = zero_point.to(torch.int16)
        centred = rows - zero[:, None]
        if int(centred.min()) >= _INT8_MIN and int(centred.max()) <= _INT8_MAX:
            return cls(centred.to(torch.int8), torch.zeros_like(zero))
        offset = int8_offset(bits, qmin)
        return cls((rows - offset).to(torch.int8), zero - offset)

    def codes(self, zero_point: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
        """The integer codes (int16, `weight_shape`) back: `matrix + (zw - zero_shift)`."""
        shift = (zero_point.to(torch.int32) - self.zero_shift)[:, None]
        return from_rows((self.matrix.int() + shift).to(torch.int16), weight_shape)

    def extra_repr(self) -> str:
        held = "plain" if self.packed_by is None else self.packed_by.name
        return f"{self.shape}, centred={self.centred}, held={held}"
