"""The fast forward of the integer layers: quantize once, sum exactly, rescale in place.

    y = (sum_k (a - za)(w - zw)) * s_a * s_w + bias

Same numbers as the reference path (`IntLayer.reference_forward`): the same activation
codes (`qdiff.kernels.int8_acts`), the same exact integer sums (a `qdiff.kernels.Kernel`;
convolutions as one int8 matmul over `im2col` patches, or the kernel's own convolution),
and the rescale in the reference's order and dtype, in place. What differs is what is
paid per call: the weights are int8 operands prepared once (`Int8Weight`), not decoded
from packed bytes, and the sum runs on the kernel the registry gives for the layer's
setting and these operands (`qdiff.kernels.candidates`; "auto" times them per shape).

A convolution whose activation grid varies within a sample (per token: a step size per
input position) has no integer form: the positions of one patch carry different scales.
It runs the reference computation (`ActCodesModule.one_grid_per_sample`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch

from qdiff.kernels import Int8Acts, Kernel, candidates, int8_acts, pick
from qdiff.kernels.base import sample_zero

if TYPE_CHECKING:
    from .int_layers import IntLayer, IntLinear, _IntConv


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _rescale_(y: torch.Tensor, layer: "IntLayer", scale: torch.Tensor,
              channel_shape: tuple[int, ...]) -> torch.Tensor:
    """In place, in the reference's order: y * s_a * s_w + bias."""
    y.mul_(scale.to(y.dtype)).mul_(layer.weight_scale.view(channel_shape).to(y.dtype))
    if layer.bias is not None:
        y.add_(layer.bias.view(channel_shape).to(y.dtype))
    return y


def _rows_zero(acts: Int8Acts, rows_shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """The residual zero point of each row of the (M, K) operand, (M,) int32, or None."""
    return None if acts.zero is None else acts.zero.expand(rows_shape).reshape(-1)


def _runs(kernels: tuple[Kernel, ...], run: Callable[[Kernel], torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    return {kernel.name: (lambda kernel=kernel: run(kernel)) for kernel in kernels}


def linear_forward(layer: "IntLinear", x: torch.Tensor) -> torch.Tensor:
    weight = layer.int8_weight()
    inner, dtype = x.shape[-1], _out_dtype(x)
    acts = int8_acts(layer.act, x, layer.centred_acts())
    a, a_zero = acts.codes.reshape(-1, inner), _rows_zero(acts, x.shape[:-1] + (1,))
    kernels = candidates(layer.kernel, x.device, lambda kernel: kernel.supports(weight, acts.levels, acts.zero))
    runs = _runs(kernels, lambda kernel: kernel.linear(kernel.encode(a, None)[0], a_zero, weight,
                                                       acts.levels).to(dtype))
    key = ("linear", weight.shape, tuple(x.shape), x.dtype, x.device, acts.zero is None, *runs)
    y = pick(key, runs, x.device)
    y = y.view(x.shape[:-1] + (y.shape[-1],))
    return _rescale_(y, layer, acts.scale, (-1,)).to(x.dtype)


def conv_forward(layer: "_IntConv", x: torch.Tensor) -> torch.Tensor:
    if not layer.act.one_grid_per_sample:
        return layer.reference_forward(x)
    weight, dtype = layer.int8_weight(), _out_dtype(x)
    acts = int8_acts(layer.act, x, layer.centred_acts())
    zero = sample_zero(acts)
    kernels = candidates(layer.kernel, x.device,
                         lambda kernel: kernel.supports(weight, acts.levels, zero, conv=layer))
    runs = _runs(kernels, lambda kernel: kernel.conv(layer, acts, dtype))
    key = ("conv", layer.weight_shape, layer.stride, layer.padding, layer.dilation, layer.groups,
           layer.padding_mode, tuple(x.shape), x.dtype, x.device, acts.zero is None, *runs)
    y = pick(key, runs, x.device)
    channels = (1, -1) + (1,) * (x.dim() - 2)
    return _rescale_(y, layer, acts.scale, channels).to(x.dtype)
