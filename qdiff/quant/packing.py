"""Bit-packing of integer weight codes into bytes.

Codes of 2..8 bits are stored unsigned (offset by -qmin) in a container of 2, 4 or 8
bits, so 2-bit codes take a quarter byte, 3- and 4-bit codes half a byte (nibbles) and
5..8-bit codes one byte. The packed tensor is flat uint8; the caller keeps the shape.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def container_bits(bits: int) -> int:
    """Smallest of 2, 4, 8 bits that holds a `bits`-bit code."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range; supported: 2..8.")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_codes(codes: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Pack integer codes in [qmin, qmin + 2**bits - 1] into a flat uint8 tensor."""
    width = container_bits(bits)
    per_byte = 8 // width
    flat = (codes.reshape(-1).to(torch.int16) - qmin).to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.view(-1, per_byte)
    packed = torch.zeros(flat.shape[0], dtype=torch.uint8, device=codes.device)
    for slot in range(per_byte):
        packed |= flat[:, slot] << (slot * width)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, qmin: int, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of `pack_codes`: integer codes (int16) of the given shape."""
    width = container_bits(bits)
    per_byte = 8 // width
    mask = (1 << width) - 1
    slots = [(packed >> (slot * width)) & mask for slot in range(per_byte)]
    flat = torch.stack(slots, dim=1).reshape(-1)[: math.prod(shape)]
    return (flat.to(torch.int16) + qmin).reshape(tuple(shape))
