"""What a hostile user (or a failing disk) does to files: flip one bit, cut a file short."""

from __future__ import annotations

import json
from pathlib import Path


def tensor_offset(path: Path, name: str | None = None) -> int:
    """The byte offset in a safetensors file of the first element of tensor `name` (of the
    first tensor in the file when None)."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    entries = {key: value for key, value in header.items() if key != "__metadata__"}
    entry = entries[name] if name else min(entries.values(), key=lambda e: e["data_offsets"][0])
    return 8 + header_len + entry["data_offsets"][0]


def flip_bit(path: Path, offset: int, bit: int) -> None:
    """Flip bit `bit` of the byte at `offset`, in place (same size, same name)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def flip_float_exponent(path: Path, name: str | None = None) -> None:
    """Flip the top exponent bit of a float32 tensor's first element (0.0147 -> 5e36)."""
    flip_bit(path, tensor_offset(path, name) + 3, 6)  # little-endian: byte 3 holds sign, exponent


def cut(path: Path, keep: float = 0.5) -> None:
    """Truncate `path` to a fraction of its size, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
