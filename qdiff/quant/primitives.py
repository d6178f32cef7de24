"""Fake-quantization building blocks shared by every quantizer.

The forward is exact integer-grid rounding; the backward treats `round` as identity
(straight-through estimator, STE) and gives the LSQ / LSQ+ gradients (Esser et al. 2020;
Bhalgat et al. 2020). `round_ste` and `grad_scale` do it with plain autograd;
`fake_quantize` is one `autograd.Function` so that it keeps only its inputs for the
backward pass.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

#: Clipping ratios tried by the Lp search (1.0 = the plain min-max range).
DEFAULT_RATIOS = torch.linspace(0.01, 1.0, 100)
_EPS = 1e-8
#: Elements of `x` times clipping ratios that the Lp search evaluates in one batch: 4 MB per
#: float32 temporary, about the size that ran fastest on 2 cores (per-ratio calls cost more
#: in overhead than compute on small tensors; larger batches leave the cache).
SEARCH_ELEMENTS = 1 << 20


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value `x`, gradient multiplied by `g` (LSQ keeps step-size updates in scale with weights)."""
    scaled = x * g
    return (x - scaled).detach() + scaled


def int_range(bits: int, symmetric: bool) -> Tuple[int, int]:
    """Integer code range (qmin, qmax): signed for symmetric, unsigned for asymmetric."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is out of range; supported: 2..8.")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_gradient_factor(numel: int, qmax: int) -> float:
    """LSQ step-size gradient scale 1/sqrt(N * Qp), N = elements sharing one step size."""
    return 1.0 / math.sqrt(max(numel, 1) * max(qmax, 1))


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  qmin: int, qmax: int) -> torch.Tensor:
    """`(clamp(round(x/s) + zp, qmin, qmax) - zp) * s` with STE rounding.

    Clamping *before* rounding gives the same values (the bounds are integers) but makes
    "inside the range" depend on the unrounded `x/s + zp`, as LSQ defines it. The gradients
    are, for the step size, `round(x/s) - x/s` inside and `qmin - zp` / `qmax - zp` at or
    beyond the bounds (LSQ); for the zero point `0` inside and `-s` outside (LSQ+); for `x`,
    1 inside and 0 outside (STE). "Inside" is strict, qmin < x/s + zp < qmax, as in LSQ and
    in torch.clamp's backward: a weight exactly on the grid's end code (every packed W0 has
    some) counts as clipped. The zero point is rounded (STE) so the grid stays integer.
    """
    return _FakeQuantize.apply(x, scale, round_ste(zero_point), qmin, qmax)


class _FakeQuantize(torch.autograd.Function):
    """`fake_quantize` saving only its inputs for the backward pass.

    Autograd through the chain x/s + zp -> clamp -> round -> -zp -> *s would keep two more
    tensors of x's size; for the weights of every layer of a large model that is two extra
    copies of the model (half-width SD: forward peak 5.2 GB against 0.6 GB for the float
    model). The backward pass recomputes x/s + zp and then runs the chain's own backward
    formulas in the chain's order, so the gradients are autograd's, bit for bit.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,  # type: ignore[override]
                qmin: int, qmax: int) -> torch.Tensor:
        ctx.save_for_backward(x, scale, zp)
        ctx.qmin, ctx.qmax = qmin, qmax
        return grid_codes(x, scale, zp, qmin, qmax).sub_(zp).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        # The chain's backward formulas, each tensor computed once and reused in place (the
        # pass is memory-bound). Sums of negated terms are written as differences: negation
        # is exact, so the bits are the same.
        x, scale, zp = ctx.saved_tensors
        x_over_s = x / scale
        v = x_over_s + zp
        grad_codes = grad * scale  # through `* s`
        inside = (v > ctx.qmin).logical_and_(v < ctx.qmax)
        grad_v = torch.where(inside, grad_codes, 0)  # round (STE), clamp
        grad_x = grad_v / scale if ctx.needs_input_grad[0] else None
        grad_scale = grad_zp = None
        if ctx.needs_input_grad[1]:  # from `* s`, then from `x / s`
            from_mul = v.clamp_(ctx.qmin, ctx.qmax).round_().sub_(zp).mul_(grad)
            from_div = x_over_s.div_(scale).mul_(grad_v)
            grad_scale = from_mul.sum_to_size(scale.shape) - from_div.sum_to_size(scale.shape)
        if ctx.needs_input_grad[2]:  # from `+ zp`, then from `- zp`
            grad_zp = grad_v.sum_to_size(zp.shape) - grad_codes.sum_to_size(zp.shape)
        return grad_x, grad_scale, grad_zp, None, None


@torch.no_grad()
def grid_codes_and_clipped(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                           qmin: int, qmax: int, overwrite: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """`grid_codes`, and where `fake_quantize`'s backward passes no gradient to `x` (the
    complement of its strict "inside"), from one x/s + zp. `overwrite`: compute in `x`'s own
    memory where its dtype allows (`x` is a temporary the caller no longer needs), which
    spares allocating, and first touching, a weight-sized tensor."""
    in_place = overwrite and x.dtype == torch.result_type(x, scale)
    v = torch.addcdiv(zero_point, x, scale, out=x if in_place else None)
    clipped = (v > qmin).logical_and_(v < qmax).logical_not_()
    return v.clamp_(qmin, qmax).round_(), clipped


def grid_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
               qmax: int) -> torch.Tensor:
    """`fake_quantize`'s integer codes (as floats), for an integer `zero_point`: its forward
    up to the multiply back, and what the export's weight and activation codes must equal.
    The zero point is added before rounding: `round(x/s) + zp` would differ at halves
    (round half to even: round(2.5) + 1 = 3, round(3.5) = 4)."""
    return torch.addcdiv(zero_point, x, scale).clamp_(qmin, qmax).round_()  # zp + x / s in one pass


def per_token_grid(tokens: torch.Tensor, ratio: torch.Tensor, qmin: int, qmax: int,
                   symmetric: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) of each (..., C) token from its own range, clipped by `ratio`.

    The one definition of the per-token grid: the training quantizer fake-quantizes on it
    and the export computes integer codes on it, so the two agree to the last bit.
    """
    high = tokens.amax(dim=-1, keepdim=True).clamp_min(0)
    low = tokens.amin(dim=-1, keepdim=True).clamp_max(0)
    if symmetric:
        scale = ratio * torch.maximum(high, -low) / qmax
        zero_point = torch.zeros_like(high)
    else:
        span = (high - low).clamp_min(1e-8)
        scale = ratio * span / (qmax - qmin)
        zero_point = torch.round(qmin - low * (qmax - qmin) / span)
    return scale.clamp_min(1e-8), zero_point


def scale_from_range(low: torch.Tensor, high: torch.Tensor, qmin: int, qmax: int,
                     symmetric: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step size and zero point that map [low, high] onto the integer grid."""
    low = torch.minimum(low, torch.zeros_like(low))
    high = torch.maximum(high, torch.zeros_like(high))
    if symmetric:
        scale = torch.maximum(-low / -qmin, high / qmax).clamp_min(_EPS)
        return scale, torch.zeros_like(scale)
    scale = ((high - low) / (qmax - qmin)).clamp_min(_EPS)
    zero_point = torch.clamp(torch.round(qmin - low / scale), qmin, qmax)
    return scale, zero_point


def _reduce_dims(x: torch.Tensor, channel_dim: Optional[int]) -> Tuple[int, ...]:
    return tuple(d for d in range(x.dim()) if d != channel_dim) if channel_dim is not None \
        else tuple(range(x.dim()))


def minmax_init(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                channel_dim: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale / zero point covering the full range of `x` (per channel or per tensor)."""
    dims = _reduce_dims(x, channel_dim)
    return scale_from_range(x.amin(dim=dims), x.amax(dim=dims), qmin, qmax, symmetric)


def lp_search_init(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, p: float = 2.4,
                   channel_dim: Optional[int] = None,
                   ratios: torch.Tensor = DEFAULT_RATIOS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale / zero point minimising mean |x - Q(x)|^p over clipping ratios of the range.

    Why: min-max wastes most of the grid on rare outliers; shrinking the range by a
    searched ratio trades clipping error for rounding error (EfficientDM uses p = 2.4).
    Each channel (or the whole tensor) keeps the ratio with the lowest error (the first
    of equals). Ratios are tried a batch at a time along a new leading dimension, as many
    as fit `SEARCH_ELEMENTS`: one set of kernel calls per batch instead of one per ratio,
    which is most of the cost on the small tensors of a layer's activations.
    """
    x = x.detach().float()
    dims = _reduce_dims(x, channel_dim)
    low, high = x.amin(dim=dims), x.amax(dim=dims)
    best_err = torch.full_like(low, float("inf"))
    best_scale, best_zp = scale_from_range(low, high, qmin, qmax, symmetric)
    for batch in ratio_batches(ratios.to(low), x.numel()):
        tried = batch.reshape(-1, *[1] * low.dim())  # (R, *low.shape)
        scale, zp = scale_from_range(low * tried, high * tried, qmin, qmax, symmetric)
        scale_x, zp_x = _view_ratios(scale, x, channel_dim), _view_ratios(zp, x, channel_dim)
        q = grid_codes(x, scale_x, zp_x, qmin, qmax).sub_(zp_x).mul_(scale_x)
        err = q.sub_(x).abs_().pow_(p).mean(dim=tuple(d + 1 for d in dims))  # (R, *low.shape)
        err, index = err.nan_to_num_(nan=float("inf")).min(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale.gather(0, index[None])[0], best_scale)
        best_zp = torch.where(better, zp.gather(0, index[None])[0], best_zp)
    return best_scale, best_zp


def ratio_batches(ratios: torch.Tensor, elements: int) -> Tuple[torch.Tensor, ...]:
    """`ratios` in batches of as many as fit `SEARCH_ELEMENTS` for a searched tensor of
    `elements` values (at least one ratio per batch)."""
    return ratios.split(max(1, SEARCH_ELEMENTS // max(elements, 1)))


def _view_ratios(t: torch.Tensor, x: torch.Tensor, channel_dim: Optional[int]) -> torch.Tensor:
    """(R, channels) or (R,) search values shaped to broadcast against x with a leading R."""
    shape = [t.shape[0]] + [1] * x.dim()
    if channel_dim is not None:
        shape[1 + channel_dim] = -1
    return t.reshape(shape)


def init_scale(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool, method: str,
               p: float = 2.4, channel_dim: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on the init method named in `QuantConfig.weight_init` ("minmax" or "mse")."""
    if method == "minmax":
        return minmax_init(x.detach().float(), qmin, qmax, symmetric, channel_dim)
    if method == "mse":
        return lp_search_init(x, qmin, qmax, symmetric, p, channel_dim)
    raise ValueError(f"Unknown init method '{method}'; choose 'minmax' or 'mse'.")
