"""int8 patches of a convolution input, so that the convolution becomes one int8 matmul.

PyTorch has no integer convolution and its `unfold` takes float inputs only, so the
patches are gathered here from int8 codes: the input goes channels-last into a padded
buffer, then one strided copy per kernel offset fills a (B, *out, *kernel, C) tensor,
whose rows are the patches (kernel offsets outer, channels inner, as `int8_weight.to_rows`).
int8 copies move a quarter of float32's bytes; the matmul dominates.

Padding: the convolution pads its *real-valued* input with zeros, i.e. with codes equal
to the zero point; centred codes (`code - zp`) are therefore padded with 0, offset codes
with each sample's residual zero point `fill`.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _padded_channels_last(codes: torch.Tensor, padding: Sequence[int],
                          fill: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, C, *spatial) -> (B, *(spatial + 2 padding), C), border filled per sample."""
    batch, channels, *spatial = codes.shape
    shape = (batch, *(s + 2 * p for s, p in zip(spatial, padding)), channels)
    if fill is None:
        buffer = codes.new_zeros(shape)
    else:
        buffer = fill.to(codes.dtype).reshape((batch,) + (1,) * (len(shape) - 1)).expand(shape).clone()
    interior = (slice(None),) + tuple(slice(p, p + s) for p, s in zip(padding, spatial))
    buffer[interior] = codes.movedim(1, -1)
    return buffer


def im2col(codes: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Patches of int8 `codes` (B, C, *spatial) as (B * prod(out), prod(kernel) * C)."""
    batch, channels, *spatial = codes.shape
    out = [out_size(*args) for args in zip(spatial, kernel, stride, padding, dilation)]
    pointwise = all(k == 1 for k in kernel) and all(s == 1 for s in stride) and not any(padding)
    if pointwise:
        return codes.movedim(1, -1).reshape(-1, channels)
    source = _padded_channels_last(codes, padding, fill)
    patches = codes.new_empty((batch, *out, *kernel, channels))
    dims = len(kernel)
    for offsets in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(o * d, o * d + s * (n - 1) + 1, s)
                       for o, d, s, n in zip(offsets, dilation, stride, out))
        patches[(slice(None),) + (slice(None),) * dims + offsets] = source[(slice(None),) + window]
    return patches.view(batch * math.prod(out), -1)
