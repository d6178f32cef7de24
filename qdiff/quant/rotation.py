"""Hadamard rotation of a layer's input (QuaRot-style), so that 4-bit activations lose less.

A Linear computes x W^T = (x H)(W H)^T for any orthogonal H. Rotating the input by a
Hadamard matrix spreads a few large channels over all of them, which shrinks the range
that per-token quantization has to cover; the weight is rotated once, offline, so only
`x @ H` runs at inference. It pays where a token's range is set by a few channels, such
as the modulated LayerNorm outputs that feed a DiT block's attention and FFN; it costs
where the input is one-signed (after a GELU), whose asymmetric grid it makes symmetric.

H = kron(P, S) / sqrt(width): S a Sylvester matrix of size 2**k, applied by the fast
Walsh-Hadamard transform, and for other widths P a Paley matrix of size q + 1 (q a prime,
q = 3 mod 4), a small matmul. That covers the widths of the models qdiff targets (96, 1536,
1920, 3072, 5120, ...) at O(width * (log width + q)) per token, and nothing is stored
but P's +-1 entries. The student and its export call the same `HadamardRotation`, so they
rotate with the very same arithmetic.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a +-1 Hadamard matrix of size q + 1, q a prime = 3 mod 4."""
    squares = {(i * i) % q for i in range(1, q)}
    index = torch.arange(q)
    diff = (index.view(1, -1) - index.view(-1, 1)) % q  # j - i
    residue = torch.tensor([0.0] + [1.0 if d in squares else -1.0 for d in range(1, q)])
    skew = torch.zeros(q + 1, q + 1)
    skew[0, 1:], skew[1:, 0] = 1.0, -1.0
    skew[1:, 1:] = residue[diff]
    return torch.eye(q + 1) + skew


def _paley_size(width: int) -> int:
    """The size of P: 1 (width a power of two), else the smallest q + 1 for Paley's q; 0 if
    none fits. Smallest, because P is applied as a dense (q + 1)-wide matmul: 1536 is
    12 * 128 (a 12-wide P), not 384 * 4."""
    power = width & -width  # the largest power of two dividing width
    while power >= 1:
        size = width // power
        if size == 1 or (size % 4 == 0 and _is_prime(size - 1) and (size - 1) % 4 == 3):
            return size
        power //= 2
    return 0


def _walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ S along the last dim (a power of two), S the unnormalised Sylvester matrix."""
    shape, width, half = x.shape, x.shape[-1], 1
    while half < width:
        pairs = x.reshape(*shape[:-1], width // (2 * half), 2, half)
        first, second = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((first + second, first - second), dim=-2)
        half *= 2
    return x.reshape(shape)


class HadamardRotation(nn.Module):
    """x -> x @ H along the last dim, H the orthogonal Hadamard matrix of `width`."""

    def __init__(self, width: int) -> None:
        super().__init__()
        paley_size = _paley_size(width)
        if paley_size == 0:
            raise ValueError(
                f"No Hadamard rotation of width {width}: qdiff builds them for widths 2**k and "
                f"2**k * (q + 1), q a prime with q % 4 == 3 (e.g. 96, 1536, 1920, 5120). Leave "
                f"the layers of input width {width} out of quant.rotate_inputs.")
        self.width = width
        paley: Optional[torch.Tensor] = _paley(paley_size - 1).T.contiguous() if paley_size > 1 else None
        self.register_buffer("paley_t", paley, persistent=False)  # P^T: +-1, exact in any dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.width:
            raise ValueError(f"HadamardRotation of width {self.width} got an input of width {x.shape[-1]}.")
        if self.paley_t is None:
            return _walsh_hadamard(x) / math.sqrt(self.width)
        blocks = x.reshape(*x.shape[:-1], self.paley_t.shape[0], -1)  # (..., q + 1, 2**k)
        mixed = torch.matmul(self.paley_t.to(x.dtype), _walsh_hadamard(blocks))
        return mixed.reshape(x.shape) / math.sqrt(self.width)

    def matrix(self) -> torch.Tensor:
        """H itself, (width, width) float32 (its rows are the rotated unit vectors)."""
        return self(torch.eye(self.width, device=self._device()))

    def _device(self) -> Optional[torch.device]:
        return None if self.paley_t is None else self.paley_t.device

    def extra_repr(self) -> str:
        return f"width={self.width}"
