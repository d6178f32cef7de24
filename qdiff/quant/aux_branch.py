"""QVGen auxiliary branch Phi = L @ R on a quantized layer's quantized input.

At low bit-widths the student starts far from the teacher and the distillation gradient
is noisy; Phi absorbs the weight quantization error `W - Q(W)` (initialised from its
top-r SVD), so training starts from a much better point. `RankDecay` then removes Phi
gradually, leaving a model that needs no extra branch at inference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (L, R), L @ R = best rank-`rank` approximation of `matrix`, split balanced."""
    u, s, vh = torch.linalg.svd(matrix.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


class AuxBranch(nn.Module):
    """Low-rank weight `L @ diag(mask) @ R` of shape (out, fan_in).

    `mask` is the rank-decay factor per component (1 = kept, fading within a phase); it
    is recomputed by the schedule, so it is not saved. `phase` (saved) counts the decay
    phases already completed, so a resumed run continues where it stopped.
    """

    def __init__(self, out_features: int, fan_in: int, rank: int) -> None:
        super().__init__()
        self.L = nn.Parameter(torch.zeros(out_features, rank))
        self.R = nn.Parameter(torch.zeros(rank, fan_in))
        self.register_buffer("mask", torch.ones(rank), persistent=False)
        self.register_buffer("phase", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_error(cls, error: torch.Tensor, rank: int) -> "AuxBranch":
        """Initialise from the top-`rank` SVD of the weight error (out, ...) flattened per row."""
        matrix = error.reshape(error.shape[0], -1)
        rank = min(rank, *matrix.shape)
        branch = cls(matrix.shape[0], matrix.shape[1], rank).to(error.device)
        left, right = truncated_svd(matrix, rank)
        with torch.no_grad():
            branch.L.copy_(left)
            branch.R.copy_(right)
        return branch

    @property
    def rank(self) -> int:
        return self.R.shape[0]

    def extra_repr(self) -> str:
        return f"out={self.L.shape[0]}, fan_in={self.R.shape[1]}, rank={self.rank}"

    def weight(self) -> torch.Tensor:
        """The (decayed) product L diag(mask) R, shape (out, fan_in)."""
        return (self.L * self.mask) @ self.R

    def forward_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Phi^T through the factors (two thin matmuls instead of a full weight)."""
        return F.linear(F.linear(x, self.R) * self.mask.to(x.dtype), self.L)

    @torch.no_grad()
    def set_decay(self, keep: int, factor: float) -> None:
        """Keep the first `keep` components, scale the others by `factor`."""
        self.mask.fill_(factor)
        self.mask[:keep] = 1.0

    @torch.no_grad()
    def refactor(self, rank: int) -> None:
        """Replace L, R (same Parameter objects, new shapes) by the top-`rank` SVD of the product."""
        left, right = truncated_svd(self.weight(), rank)
        self.L.data = left.to(self.L.dtype)
        self.R.data = right.to(self.R.dtype)
        self.mask = torch.ones(rank, device=self.mask.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        """Adopt the checkpoint's rank (decay may have shrunk it) before loading."""
        incoming = state_dict.get(prefix + "R")
        if incoming is not None and incoming.shape != self.R.shape:
            self.L.data = self.L.new_zeros(self.L.shape[0], incoming.shape[0])
            self.R.data = self.R.new_zeros(incoming.shape)
            self.mask = torch.ones(incoming.shape[0], device=self.mask.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
