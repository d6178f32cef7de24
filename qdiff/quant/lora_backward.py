"""QALoRA's gradients without forming the full weight gradient (`lora.low_rank_backward`).

A layer applies W_q = Q_w(W0 + B A). Autograd forms dL/dW_q = g^T x, an out x in matrix
costing tokens x out x in multiply-adds -- exactly full QAT's weight gradient -- and only
then projects it onto B and A, so QALoRA alone saves no backward time
(eval/results/training_cost/step-phases.md). With the weight quantizer's step sizes and zero points
frozen, the straight-through estimator gives dL/d(BA) = M * (g^T x), with M zero where
W0 + BA is clipped (on or past an end code, `fake_quantize`'s strict "inside") and one
elsewhere. Writing M = 1 - C:

    dB = g^T (x A^T) - (C * g^T x) A^T
    dA = (g B)^T x   - B^T (C * g^T x)

The first terms are rank-r products, 2 r (out + in) multiply-adds per token instead of
out x in. The corrections need g^T x only at the K clipped entries, one dot product over
tokens each: gathered, memory-bound work, far slower per multiply-add than a matrix
product. So a layer with many clipped weights (an Lp-searched grid, packed W0's end codes)
is cheaper the dense way -- form g^T x, zero it at C, project -- and `low_rank_is_cheaper`
picks per call from the counts. Either way the gradients are autograd's up to float
rounding (tests/test_lora_backward.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from .layers import QuantLayer

#: Cost of one gathered multiply-add of the correction relative to one multiply-add of the
#: dense weight gradient, measured on 2 cores by `python -m eval.training_cost.gather_cost`
#: (eval/results/training_cost/gather-cost.md: median 129, 39-382 over SD-1.5's layer shapes; noisy).
GATHER_COST = 150.0
#: Elements of the gathered (entries x tokens) operands formed at once (16 MB in float32).
GATHER_CHUNK = 1 << 22


def low_rank_is_cheaper(out_features: int, in_features: int, rank: int, clipped: int) -> bool:
    """Low-rank products plus K gathered dot products against one dense out x in product."""
    return 2 * rank * (out_features + in_features) + GATHER_COST * clipped < out_features * in_features


def lora_grads(ops: "GradOps", x: torch.Tensor, grad: torch.Tensor, lora_B: torch.Tensor,
               lora_A: torch.Tensor, clipped: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dB, dA) for W = W0 + B A under frozen quantizer parameters: `x` the layer's input,
    `grad` its output's gradient, `clipped` (weight-shaped) True where W0 + B A passes none."""
    rank, mask = lora_A.shape[0], clipped.flatten(1)
    rows, cols = mask.nonzero(as_tuple=True)
    if not low_rank_is_cheaper(*mask.shape, rank, rows.numel()):
        weight_grad = ops.weight_grad(x, grad).flatten(1).masked_fill_(mask, 0)
        return weight_grad @ lora_A.flatten(1).t(), (lora_B.t() @ weight_grad).view_as(lora_A)
    grad_B, grad_A = ops.lora_products(x, grad, lora_B, lora_A)
    if rows.numel():
        at_clipped = ops.weight_grad_at(x, grad, rows, cols)[:, None]
        grad_B.index_add_(0, rows, at_clipped * lora_A.flatten(1).t()[cols], alpha=-1)
        grad_A.view(rank, -1).index_add_(1, cols, (at_clipped * lora_B[rows]).t(), alpha=-1)
    return grad_B, grad_A


class GradOps:
    """The gradient products of one layer kind, for its input x and output gradient g."""

    def input_grad(self, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_grad(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The full weight gradient, weight-shaped."""
        raise NotImplementedError

    def lora_products(self, x: torch.Tensor, grad: torch.Tensor, lora_B: torch.Tensor,
                      lora_A: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(dW A^T, B^T dW), B's gradient and A's (A-shaped) before the clipping correction,
        without forming dW."""
        raise NotImplementedError

    def weight_grad_at(self, x: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor,
                       cols: torch.Tensor) -> torch.Tensor:
        """dW.flatten(1)[rows, cols]: one dot product over tokens per entry."""
        raise NotImplementedError


class LinearGradOps(GradOps):
    """y = x W^T over any leading dimensions, seen as (tokens, in) and (tokens, out) matrices."""

    @staticmethod
    def _matrices(x: torch.Tensor, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])

    def input_grad(self, x, weight, grad):  # type: ignore[override]
        return grad @ weight

    def weight_grad(self, x, grad):  # type: ignore[override]
        x, grad = self._matrices(x, grad)
        return grad.t() @ x

    def lora_products(self, x, grad, lora_B, lora_A):  # type: ignore[override]
        x, grad = self._matrices(x, grad)
        return grad.t() @ (x @ lora_A.t()), (grad @ lora_B).t() @ x

    def weight_grad_at(self, x, grad, rows, cols):  # type: ignore[override]
        x, grad = self._matrices(x, grad)
        x_t, grad_t = x.t().contiguous(), grad.t().contiguous()  # each gather reads whole rows
        step = max(1, GATHER_CHUNK // max(1, x.shape[0]))
        return torch.cat([torch.einsum("kt,kt->k", grad_t.index_select(0, rows[i:i + step]),
                                       x_t.index_select(0, cols[i:i + step]))
                          for i in range(0, rows.numel(), step)])


class Conv2dGradOps(GradOps):
    """An ungrouped, zero-padded Conv2d. The low-rank products are convolutions with `rank`
    channels; a clipped entry (o, c, kh, kw) is the dot product of g's channel o with the
    input's channel c as kernel tap (kh, kw) meets it, taken one tap at a time, so the input
    is never unfolded into its k*k times larger im2col matrix."""

    def __init__(self, conv: nn.Conv2d) -> None:
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.kernel_size = conv.kernel_size

    def input_grad(self, x, weight, grad):  # type: ignore[override]
        return torch.nn.grad.conv2d_input(x.shape, weight, grad, self.stride, self.padding,
                                          self.dilation)

    def weight_grad(self, x, grad):  # type: ignore[override]
        shape = (grad.shape[1], x.shape[1], *self.kernel_size)
        return torch.nn.grad.conv2d_weight(x, shape, grad, self.stride, self.padding, self.dilation)

    def lora_products(self, x, grad, lora_B, lora_A):  # type: ignore[override]
        x_a = F.conv2d(x, lora_A, None, self.stride, self.padding, self.dilation)  # (N, r, H', W')
        grad_B = torch.tensordot(grad, x_a, dims=([0, 2, 3], [0, 2, 3]))
        grad_b = F.conv2d(grad, lora_B.t()[:, :, None, None])  # g B at every pixel
        return grad_B, torch.nn.grad.conv2d_weight(x, lora_A.shape, grad_b, self.stride,
                                                   self.padding, self.dilation)

    def weight_grad_at(self, x, grad, rows, cols):  # type: ignore[override]
        kernel_w, taps_per_kernel = self.kernel_size[1], self.kernel_size[0] * self.kernel_size[1]
        channels, taps = cols // taps_per_kernel, cols % taps_per_kernel
        padded = F.pad(x, (self.padding[1], self.padding[1], self.padding[0], self.padding[0]))
        step = max(1, GATHER_CHUNK // max(1, grad[:, 0].numel()))
        out = grad.new_empty(rows.numel())
        for tap in taps.unique().tolist():
            pixels = self._tapped(padded, divmod(tap, kernel_w), grad.shape[2:])
            at = (taps == tap).nonzero(as_tuple=True)[0]
            for chunk in at.split(step):  # channel planes gathered straight from the strided view
                out[chunk] = torch.einsum("nkhw,nkhw->k", grad.index_select(1, rows[chunk]),
                                          pixels.index_select(1, channels[chunk]))
        return out

    def _tapped(self, padded: torch.Tensor, tap: Tuple[int, int], size: Sequence[int]) -> torch.Tensor:
        """The input pixels that kernel tap (row, col) meets: a (N, C, H', W') view."""
        (row, col), (sh, sw), (dh, dw) = tap, self.stride, self.dilation
        return padded[:, :, row * dh::sh, col * dw::sw][:, :, :size[0], :size[1]]


class LowRankLoRAFunction(torch.autograd.Function):
    """y = layer(x) with W_q = Q_w(W0 + B A), whose backward gives x, B and A their gradients
    by `lora_grads`. It keeps x, the codes of W_q and the clipped mask (a byte per weight each)
    for the backward pass, which rebuilds W_q from the codes for x's gradient; autograd keeps
    x, W_q and W0 + B A (four bytes per weight each, in float32)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor,  # type: ignore[override]
                layer: "QuantLayer") -> torch.Tensor:
        weight = layer.adapted_weight()  # a fresh tensor (W0 + B A): quantized in its memory
        quantized, codes, clipped = layer.weight_quantizer.quantize_and_clipped(weight, overwrite=True)
        ctx.ops, ctx.quantizer = layer.grad_ops(), layer.weight_quantizer
        ctx.dtypes = quantized.dtype, weight.dtype
        ctx.save_for_backward(x, lora_B, lora_A, codes, clipped)
        return layer._apply_weight(x, quantized.to(weight.dtype), layer.base_layer.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, lora_B, lora_A, codes, clipped = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            value_dtype, weight_dtype = ctx.dtypes
            quantized = ctx.quantizer.dequantize(codes, value_dtype).to(weight_dtype)
            grad_x = ctx.ops.input_grad(x, quantized, grad)
        grad_B, grad_A = lora_grads(ctx.ops, x, grad, lora_B, lora_A, clipped)
        return grad_x, grad_B, grad_A, None
