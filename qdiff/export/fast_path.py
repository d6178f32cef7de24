"""The fast forward of the integer layers: quantize once, sum exactly, rescale in place.

    y = (sum_k (a - za)(w - zw)) * s_a * s_w + bias

Same numbers as the reference path (`IntLayer.reference_forward`): the same activation
codes (`int8_acts`), the same exact integer sums (`int8_gemm`; convolutions as int8
matmuls over `im2col` patches), and the rescale in the reference's order and dtype, in
place. What differs is what is paid per call: the weights are int8 operands prepared
once (`int8_weight`), not decoded from packed bytes, and the sum runs on the kernel
that `kernel_choice` picked for the shape: `torch._int_mm` ("int8"), oneDNN's quantized
linear ("onednn", `onednn_gemm`) or the exact float sum ("float").

A per-token convolution (a step size per input position) has no integer form: the
positions of one patch carry different scales. It runs the reference computation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import torch

from . import onednn_gemm
from .act_codes import TokenActCodes
from .im2col import im2col, out_size
from .int8_acts import Int8Acts, int8_acts
from .int8_gemm import (centred_float, centred_weight, exact_float_dtype, float_sum, int8_fits,
                        int8_sum)
from .int8_weight import from_rows
from .kernel_choice import integer_kernel, pick

if TYPE_CHECKING:
    from .int8_weight import Int8Weight
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


def _candidates(layer: "IntLayer", sums: dict[str, Callable], usable: dict[str, bool],
                device: torch.device) -> dict[str, Callable]:
    """A forced kernel (the float sum where it cannot run), or for "auto" the device's
    integer kernel (where usable) and the float sum, to be timed against each other."""
    if layer.kernel in ("int8", "onednn"):
        return {layer.kernel: sums[layer.kernel]} if usable[layer.kernel] else {"float": sums["float"]}
    if layer.kernel == "float":
        return {"float": sums["float"]}
    integer = integer_kernel(device)
    return {**({integer: sums[integer]} if usable[integer] else {}), "float": sums["float"]}


def _usable(layer: "IntLayer", device: torch.device, weight: "Int8Weight",
            zero: Optional[torch.Tensor], int8_ok: bool) -> dict[str, bool]:
    """Where each integer kernel gives the exact sum (see `int8_gemm`, `onednn_gemm`); oneDNN's
    is checked only where the layer may run it. `zero`: the residual zero points (one per
    sample, not expanded to rows) or None."""
    wants_onednn = layer.kernel == "onednn" or (layer.kernel == "auto" and integer_kernel(device) == "onednn")
    return {"int8": int8_ok, "onednn": wants_onednn and int8_ok and onednn_gemm.available(device)
            and onednn_gemm.exact_for(weight, zero)}


def _integer_sum(name: str, a: torch.Tensor, a_zero: Optional[torch.Tensor],
                 weight: "Int8Weight") -> torch.Tensor:
    """(M, N) exact sums on integer kernel `name`: int32 from `_int_mm`, float32 from oneDNN."""
    if name == "onednn":
        return onednn_gemm.onednn_sum(onednn_gemm.shifted(a), a_zero, weight)
    return int8_sum(a, a_zero, weight)


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
    usable = _usable(layer, x.device, weight, acts.zero, int8_fits(inner, _act_levels(layer), weight))
    sums = {name: (lambda name=name: _integer_sum(name, a, a_zero, weight).to(dtype)) for name in usable}
    sums["float"] = lambda: float_sum(a, a_zero, weight, float_dtype).to(dtype)
    candidates = _candidates(layer, sums, usable, x.device)
    key = ("linear", weight.shape, tuple(x.shape), x.dtype, x.device, acts.zero is None, *usable.values())
    y = pick(key, candidates, x.device)
    y = y.view(x.shape[:-1] + (y.shape[-1],))
    return _rescale_(y, layer, acts.scale, (-1,)).to(x.dtype)


def _conv_integer(name: str, layer: "_IntConv", acts: Int8Acts, dtype: torch.dtype) -> torch.Tensor:
    """Sum over int8 patches on integer kernel `name`, returned as a (B, O, *out) `dtype` tensor."""
    batch, _, *spatial = acts.codes.shape
    kernel = layer.weight_shape[2:]
    zero = _sample_zero(acts)
    out = tuple(out_size(*args) for args in zip(spatial, kernel, layer.stride, layer.padding, layer.dilation))
    a_zero = None if zero is None else zero[:, None].expand(batch, math.prod(out)).reshape(-1)
    if name == "onednn":  # uint8 patches from uint8 codes: the shift costs a pass over the codes only
        fill = torch.full((batch,), onednn_gemm.SHIFT) if zero is None else zero + onednn_gemm.SHIFT
        patches = im2col(onednn_gemm.shifted(acts.codes), kernel, layer.stride, layer.padding,
                         layer.dilation, fill)
        acc = onednn_gemm.onednn_sum(patches, a_zero, layer.int8_weight())
    else:
        patches = im2col(acts.codes, kernel, layer.stride, layer.padding, layer.dilation, zero)
        acc = int8_sum(patches, a_zero, layer.int8_weight())
    y = torch.empty((batch, acc.shape[1], *out), dtype=dtype, device=acc.device)
    return y.copy_(acc.view(batch, *out, acc.shape[1]).movedim(-1, 1))


def _sample_zero(acts: Int8Acts) -> Optional[torch.Tensor]:
    """The residual zero point of each sample, (B,), or None when centred."""
    return None if acts.zero is None else acts.zero.reshape(acts.codes.shape[0])


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
    inner = weight.shape[1]
    float_dtype = exact_float_dtype(inner, _act_levels(layer), weight, x.device)
    int8_ok = (layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
               and int8_fits(inner, _act_levels(layer), weight))
    usable = _usable(layer, x.device, weight, _sample_zero(acts), int8_ok)
    sums = {name: (lambda name=name: _conv_integer(name, layer, acts, dtype)) for name in usable}
    sums["float"] = lambda: _conv_float(layer, acts, float_dtype, dtype)
    candidates = _candidates(layer, sums, usable, x.device)
    key = ("conv", layer.weight_shape, layer.stride, layer.padding, layer.dilation, layer.groups,
           layer.padding_mode, tuple(x.shape), x.dtype, x.device, acts.zero is None, *usable.values())
    y = pick(key, candidates, x.device)
    channels = (1, -1) + (1,) * (x.dim() - 2)
    return _rescale_(y, layer, acts.scale, channels).to(x.dtype)

