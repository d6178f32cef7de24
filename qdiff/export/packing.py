"""Dense bit-packing of the exported integer weight codes.

Every group of 8 codes of `bits` bits becomes exactly `bits` bytes (little-endian bit
order), so 4-bit codes take half a byte, 2-bit codes a quarter and 3-bit codes three
eighths: unlike the nibble containers of `qdiff.quant.packing` (used while training),
nothing is wasted at odd bit-widths, which is what the exported file is for.
Codes are stored unsigned, offset by `qmin`.
"""

from __future__ import annotations

import math

import torch

_GROUP = 8  # codes per group: 8 codes of b bits fill b whole bytes


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take."""
    return math.ceil(numel / _GROUP) * bits


def pack_dense(codes: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Integer codes in [qmin, qmin + 2**bits - 1] (any shape) -> flat uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range; supported: 1..8.")
    flat = codes.reshape(-1).to(torch.int64) - qmin
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes outside [{qmin}, {qmin + 2**bits - 1}] cannot be packed in {bits} bits.")
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % _GROUP)]).view(-1, _GROUP)
    shifts = torch.arange(_GROUP, device=codes.device) * bits
    words = (flat << shifts).sum(dim=1)  # 8 codes in the low 8*bits bits of an int64
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    return ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_dense(packed: torch.Tensor, bits: int, qmin: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_dense`: the first `numel` codes, as a flat int16 tensor."""
    if 8 % bits == 0:  # whole codes per byte: byte-wise shifts, no int64 words (fast kernels unpack once)
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        codes = (packed[:, None] >> shifts) & ((1 << bits) - 1)
        return (codes.reshape(-1)[:numel].to(torch.int16) + qmin)
    groups = packed.view(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (groups << byte_shifts).sum(dim=1)
    shifts = torch.arange(_GROUP, device=packed.device) * bits
    codes = (words[:, None] >> shifts) & ((1 << bits) - 1)
    return (codes.reshape(-1)[:numel] + qmin).to(torch.int16)
