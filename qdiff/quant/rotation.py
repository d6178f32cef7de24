"""Hadamard rotation of a layer's input (QuaRot-style), so that 4-bit activations lose less.

A Linear computes x W^T = (x H)(W H)^T for any orthogonal H. Rotating the input by a
Hadamard matrix spreads a few large channels over all of them, which shrinks the range
that per-token quantization has to cover; the weight is rotated once, offline, so only
`x @ H` runs at inference. It pays where a token's range is set by a few channels, such
as the modulated LayerNorm outputs that feed a DiT block's attention and FFN; it costs
where the input is one-signed (after a GELU), whose asymmetric grid it makes symmetric.

H = kron(P, S) / sqrt(width): S a Sylvester matrix of size 2**k and, for other widths, P a
Paley matrix of size q + 1 (q a prime, q = 3 mod 4). S is itself a Kronecker product of
smaller Sylvester matrices, so x viewed as (tokens, q + 1, a, b, ...) is multiplied by
each small factor along its axis: a few batched matmuls of O(width * factor) per token
(1536 = 12 x 128: 140 multiply-adds per channel, not 1536). That covers the widths of the
models qdiff targets (96, 1536, 1920, 3072, 5120, ...), and nothing is stored but the
factors' +-1 entries. The student and its export call the same `HadamardRotation`, so they
rotate with the very same arithmetic.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

MAX_FACTOR = 128  # the largest Sylvester factor: one (rows, 128) @ (128, 128) GEMM beat
#                   two passes of 16 and 8 at width 1536 (scratch timing, 2 cores)


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


def _sylvester(size: int) -> torch.Tensor:
    """The +-1 Sylvester matrix of a power-of-two size (symmetric)."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat((torch.cat((matrix, matrix), 1), torch.cat((matrix, -matrix), 1)), 0)
    return matrix


def _sylvester_sizes(power: int) -> list[int]:
    """Split a power of two into as few as possible near-equal factors of at most
    `MAX_FACTOR` (Sylvester(a * b) = kron(Sylvester(a), Sylvester(b))): 4096 -> [64, 64]."""
    if power == 1:
        return []
    bits = power.bit_length() - 1
    count = -(-bits // (MAX_FACTOR.bit_length() - 1))  # ceil(bits / log2(MAX_FACTOR))
    sizes = [bits // count + (i < bits % count) for i in range(count)]
    return [2 ** b for b in sizes]


class HadamardRotation(nn.Module):
    """x -> x @ H along the last dim, H the orthogonal Hadamard matrix of `width`, applied
    one +-1 Kronecker factor at a time (P, then Sylvester matrices of at most `MAX_FACTOR`)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        paley_size = _paley_size(width)
        if paley_size == 0:
            raise ValueError(
                f"No Hadamard rotation of width {width}: qdiff builds them for widths 2**k and "
                f"2**k * (q + 1), q a prime with q % 4 == 3 (e.g. 96, 1536, 1920, 5120). Leave "
                f"the layers of input width {width} out of quant.rotate_inputs.")
        self.width = width
        self.paley_size = paley_size
        factors = ([_paley(paley_size - 1)] if paley_size > 1 else [])
        factors += [_sylvester(size) for size in _sylvester_sizes(width // paley_size)]
        self.factor_sizes = tuple(factor.shape[0] for factor in factors)
        for index, factor in enumerate(factors):  # +-1 entries: exact in any dtype
            self.register_buffer(f"factor{index}", factor, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.width:
            raise ValueError(f"HadamardRotation of width {self.width} got an input of width {x.shape[-1]}.")
        y = x.reshape(-1, self.width)
        rows, after = y.shape[0], self.width  # y viewed as (rows, size, after) for each factor
        for index, size in enumerate(self.factor_sizes):
            factor = getattr(self, f"factor{index}").to(x.dtype)
            after //= size
            if after == 1:  # the last axis: (rows, size) @ F
                y = y.reshape(-1, size) @ factor
            else:  # another axis: F^T @ (rows, size, after), batched over rows
                y = torch.matmul(factor.T, y.reshape(rows, size, after))
            rows *= size
        return y.reshape(x.shape) / math.sqrt(self.width)

    def matrix(self) -> torch.Tensor:
        """H itself, (width, width) float32 (its rows are the rotated unit vectors)."""
        return self(torch.eye(self.width, device=self._device()))

    def _device(self) -> Optional[torch.device]:
        return self.factor0.device if self.factor_sizes else None

    def extra_repr(self) -> str:
        return f"width={self.width}"
