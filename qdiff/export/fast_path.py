"""The fast forward of the integer layers: quantize once, sum exactly, rescale in place.

    y = (sum_k (a - za)(w - zw)) * s_a * s_w + bias

Same numbers as the reference path (`IntLayer.reference_forward`): the same activation
codes (`int8_acts`), the same exact integer sums (`int8_gemm`; convolutions as int8
matmuls over `im2col` patches), and the rescale in the reference's order and dtype, in
place. What differs is what is paid per call: the weights are int8 operands prepared
once (`int8_weight`), not decoded from packed bytes, and the sum runs on the kernel
that `kernel_choice` picked for the shape.

A per-token convolution (a step size per input position) has no integer form: the
positions of one patch carry different scales. It runs the reference computation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import torch

from .act_codes import TokenActCodes
from .im2col import im2col, out_size
from .int8_acts import Int8Acts, int8_acts
from .int8_gemm import (centred_float, centred_weight, exact_float_dtype, float_sum, int8_fits,
                        int8_sum)
from .int8_weight import from_rows
from .kernel_choice import pick

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


def _act_levels(layer: "IntLayer") -> int:
    return layer.act.qmax - layer.act.qmin


def _candidates(layer: "IntLayer", int8: Callable, exact_float: Callable,
                int8_ok: bool) -> dict[str, Callable]:
    if layer.kernel == "float" or not int8_ok:
        return {"float": exact_float}
    if layer.kernel == "int8":
        return {"int8": int8}
    return {"int8": int8, "float": exact_float}


def _rows_zero(acts: Int8Acts, rows_shape: tuple[int, ...]) -> Optional[torch.Tensor]:
    """The residual zero point of each row of the (M, K) operand, (M,) int32, or None."""
    return None if acts.zero is None else acts.zero.expand(rows_shape).reshape(-1)


def linear_forward(layer: "IntLinear", x: torch.Tensor) -> torch.Tensor:
    weight = layer.int8_weight()
    inner, dtype = x.shape[-1], _out_dtype(x)
    acts = int8_acts(layer.act, x, layer.centred_acts())
    rows_shape = x.shape[:-1] + (1,)
    a, a_zero = acts.codes.reshape(-1, inner), _rows_zero(acts, rows_shape)
    float_dtype = exact_float_dtype(inner, _act_levels(layer), weight, x.device)
    candidates = _candidates(
        layer, lambda: int8_sum(a, a_zero, weight).to(dtype),
        lambda: float_sum(a, a_zero, weight, float_dtype).to(dtype),
        int8_fits(inner, _act_levels(layer), weight))
    key = ("linear", tuple(weight.matrix.shape), tuple(x.shape), x.dtype, x.device, acts.zero is None)
    y = pick(key, candidates, x.device)
    y = y.view(x.shape[:-1] + (y.shape[-1],))
    return _rescale_(y, layer, acts.scale, (-1,)).to(x.dtype)


def _conv_int8(layer: "_IntConv", acts: Int8Acts, dtype: torch.dtype) -> torch.Tensor:
    """Sum over int8 patches, returned as a (B, O, *out) `dtype` tensor."""
    batch, _, *spatial = acts.codes.shape
    kernel = layer.weight_shape[2:]
    fill = None if acts.zero is None else acts.zero.reshape(batch)
    patches = im2col(acts.codes, kernel, layer.stride, layer.padding, layer.dilation, fill)
    out = tuple(out_size(*args) for args in zip(spatial, kernel, layer.stride, layer.padding, layer.dilation))
    a_zero = None if fill is None else fill[:, None].expand(batch, math.prod(out)).reshape(-1)
    acc = int8_sum(patches, a_zero, layer.int8_weight())
    y = torch.empty((batch, acc.shape[1], *out), dtype=dtype, device=acc.device)
    return y.copy_(acc.view(batch, *out, acc.shape[1]).movedim(-1, 1))


def _conv_float(layer: "_IntConv", acts: Int8Acts, sum_dtype: torch.dtype,
                dtype: torch.dtype) -> torch.Tensor:
    """The same sum as an exact float convolution (rounded: see `int_ops.exact_conv`)."""
    weight = from_rows(centred_weight(layer.int8_weight(), sum_dtype), layer.weight_shape)
    return layer._conv(centred_float(acts.codes, acts.zero, sum_dtype), weight).round_().to(dtype)


def conv_forward(layer: "_IntConv", x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer.act, TokenActCodes):
        return layer.reference_forward(x)
    weight, dtype = layer.int8_weight(), _out_dtype(x)
    acts = int8_acts(layer.act, x, layer.centred_acts())
    inner = weight.matrix.shape[1]
    float_dtype = exact_float_dtype(inner, _act_levels(layer), weight, x.device)
    int8_ok = (layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
               and int8_fits(inner, _act_levels(layer), weight))
    candidates = _candidates(layer, lambda: _conv_int8(layer, acts, dtype),
                             lambda: _conv_float(layer, acts, float_dtype, dtype), int8_ok)
    key = ("conv", layer.weight_shape, layer.stride, layer.padding, layer.dilation, layer.groups,
           layer.padding_mode, tuple(x.shape), x.dtype, x.device, acts.zero is None)
    y = pick(key, candidates, x.device)
    channels = (1, -1) + (1,) * (x.dim() - 2)
    return _rescale_(y, layer, acts.scale, channels).to(x.dtype)

