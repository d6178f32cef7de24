"""Dynamic per-token activation quantization with learned clipping (QVGen / ViDiT-Q style).

Transformer activations differ strongly from token to token, so each token gets its own
step size, computed on the fly from its (clipped) range; only the clipping ratio is
learned, one per timestep group (a bucket of timestep values), because the range
statistics drift along the trajectory. With `group_size`, a token's channels are cut into
consecutive groups and each group gets its own grid (as NVFP4's 16-wide blocks): a few
large channels then coarsen the grid of their own group only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch
from torch import nn

from .act_quantizer import ActQuantizer, ActTable, register_act_quantizer
from .observer import KeyedObservations, SampleObserver
from .primitives import (DEFAULT_RATIOS, fake_quantize, grad_scale, int_range, lsq_gradient_factor,
                         per_token_grid, ratio_batches)
from .timestep_context import TimestepContext

if TYPE_CHECKING:
    from qdiff.config import QuantConfig

MAX_TIMESTEP = 1000.0  # diffusers' denoisers take timesteps on a 0..1000 scale


@register_act_quantizer("dynamic_per_token")
class DynamicActQuantizer(KeyedObservations, ActQuantizer):
    """Per-token fake-quantizer: scale = ratio[group(t)] * range(token) / levels.

    `group_size` > 0: the range is each group's of `group_size` consecutive channels within
    the token (the ratio is shared by them); the channel count must be a multiple of it.

    `channel_dim` is the feature dim that a token spans: -1 for (B, tokens, C) inputs of
    Linear layers, 1 for (B, C, ...) inputs of convolutions (a token is a position).
    Calibration (`start_calibration` / `finish_calibration`) searches each group's ratio
    under the Lp norm on a sample of tokens (`init_method="mse"`); with `"minmax"`, or
    without calibration, every ratio is 1: each token's own min-max grid, which is what
    torchao's dynamic per-token int8 computes (`export.format: torchao`).
    """

    channel_groups = True

    def __init__(self, bits: int, context: TimestepContext, *, symmetric: bool = False,
                 num_groups: int = 10, channel_dim: int = -1, lsq_grad_scale: bool = True,
                 p: float = 2.4, sample_size: int = 256, group_size: int = 0,
                 init_method: str = "mse") -> None:
        super().__init__()
        if init_method not in ("mse", "minmax"):
            raise ValueError(f"init_method must be 'mse' or 'minmax', not {init_method!r}")
        self.init_method = init_method
        self.bits = bits
        self.group_size = group_size
        self.symmetric = symmetric
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.context = context
        self.channel_dim = channel_dim
        self.use_grad_scale = lsq_grad_scale
        self.p = p
        self.sample_size = sample_size
        self.calibrating = False
        self._observers: Dict[int, SampleObserver] = {}
        self.clip_ratio = nn.Parameter(torch.ones(num_groups))
        self.register_buffer("group_edges", torch.linspace(0, MAX_TIMESTEP, num_groups + 1)[1:-1])

    @classmethod
    def from_config(cls, cfg: "QuantConfig", *, bits: int, context: TimestepContext,
                    channel_dim: int, group_size: int) -> "DynamicActQuantizer":
        return cls(bits, context, symmetric=cfg.act_symmetric, num_groups=cfg.act_timestep_groups,
                   channel_dim=channel_dim, lsq_grad_scale=cfg.lsq_grad_scale, p=cfg.lp_norm,
                   group_size=group_size, init_method=cfg.act_init)

    @torch.no_grad()
    def export_table(self, name: str) -> ActTable:
        """The clipping ratio of each timestep group, as the forward uses it, and the edges."""
        return ActTable("per_token", self.clip_ratio.numel(), self.group_size, {
            "clip_ratio": self.clip_ratio.detach().clamp_min(1e-4), "group_edges": self.group_edges})

    def extra_repr(self) -> str:
        grouping = f", group_size={self.group_size}" if self.group_size else ""
        return f"bits={self.bits}, symmetric={self.symmetric}, groups={self.clip_ratio.numel()}{grouping}"

    def group_of(self, batch_size: int) -> torch.Tensor:
        """Timestep group of every row of the batch."""
        timesteps = self.context.per_sample(batch_size)
        if timesteps is None:
            if self.clip_ratio.numel() != 1:
                raise RuntimeError("No timestep is set: call the denoiser root or use `context.use(t)`.")
            return torch.zeros(batch_size, dtype=torch.long, device=self.group_edges.device)
        timesteps = timesteps.to(self.group_edges.device).contiguous()
        return torch.bucketize(timesteps, self.group_edges, right=True)

    def _quantize_tokens(self, tokens: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        """Fake-quantize (..., C) tokens, each (or each channel group) on its own grid, clipped
        by `ratio` (broadcast against the tokens)."""
        if self.group_size:
            groups = tokens.unflatten(-1, (-1, self.group_size))
            return self._quantize_tokens_whole(groups, ratio.unsqueeze(-1)).flatten(-2)
        return self._quantize_tokens_whole(tokens, ratio)

    def _quantize_tokens_whole(self, tokens: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        scale, zero_point = per_token_grid(tokens.detach(), ratio, self.qmin, self.qmax,
                                           self.symmetric)
        return fake_quantize(tokens, scale, zero_point, self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.group_of(x.shape[0])
        tokens = x.movedim(self.channel_dim, -1)
        if self.calibrating:
            self._observe_by_key(tokens, groups, row_width=tokens.shape[-1])
            return x
        ratio = self.clip_ratio
        if self.use_grad_scale:
            ratio = grad_scale(ratio, lsq_gradient_factor(x[0].numel(), self.qmax))
        ratio = ratio.clamp_min(1e-4)[groups.to(ratio.device)]
        ratio = ratio.view((-1,) + (1,) * (tokens.dim() - 1)).to(x.dtype)
        return self._quantize_tokens(tokens, ratio).movedim(-1, self.channel_dim)


    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Set each group's ratio by the Lp search (`init_method="mse"`; unobserved groups
        copy the nearest observed), or to 1 (`"minmax"`)."""
        self.calibrating = False
        if not self._observers:
            raise RuntimeError("finish_calibration(): no activations were observed.")
        if self.init_method == "minmax":
            self.clip_ratio.fill_(1.0)
            self._observers = {}
            return
        observed = sorted(self._observers)
        best = {group: self._search_ratio(self._observers[group].sample) for group in observed}
        for group in range(self.clip_ratio.numel()):
            nearest = min(observed, key=lambda g: abs(g - group))
            self.clip_ratio[group] = best[nearest]
        self._observers = {}

    def _search_ratio(self, tokens: torch.Tensor) -> float:
        """The ratio with the lowest mean |x - Q(x)|^p (the first of equals); ratios are tried
        a batch at a time along a leading dimension, as `lp_search_init` does."""
        errors = []
        for batch in ratio_batches(DEFAULT_RATIOS.to(tokens), tokens.numel()):
            q = self._quantize_tokens(tokens, batch.reshape(-1, *[1] * tokens.dim()))
            errors.append(q.sub_(tokens).abs_().pow_(self.p).flatten(1).mean(dim=1))
        return DEFAULT_RATIOS[int(torch.cat(errors).argmin())].item()
