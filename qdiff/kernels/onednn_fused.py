"""A whole integer layer in two passes on oneDNN: quantize, then sum and rescale in one op.

    u = clamp(x / s + zp, qmin, qmax) rounded, minus qmin     (uint8, one pass: `one_pass`)
    y = s * s_w[o] * sum_k (u - (zp - qmin)) w_ok + bias[o]   (oneDNN, dequantize fused)

oneDNN's quantized linear and convolution (`qlinear_pointwise`, `qconv_pointwise`, the
ops inductor lowers PyTorch 2 quantization to) take uint8 activations with a scale and
zero point, int8 weights they prepacked, per-channel weight scales and a bias, and
apply the rescale as the epilogue of the integer sum. So an integer layer is two calls
instead of the unfused path's seven or more (codes, shift, sum, zero-point correction,
conversion, two multiplies, bias), and a convolution needs no `im2col` patches.

What it needs, checked once per layer (`fusable`) and per call (a grid shared by the
batch, `ActCodesModule.shared_grid`):

- one step size and zero point for the whole call (per-timestep tables with every
  sample at one timestep, as samplers call), since the op takes scalars;
- a zero point on the code grid, so that `zp - qmin` is a uint8 zero point;
- the conditions of the unfused oneDNN sum (`onednn_gemm.exact_for`): centred weights
  within the pairwise int16 bound;
- float32 or bfloat16 activations (the op's output types); zero padding given as sizes.

The codes are the reference path's (`grid_codes`: the same arithmetic in the input's
dtype) and the sum is exact (int32), so the output equals the reference's up to the
float rounding of the rescale: oneDNN multiplies by s * s_w[o] once, the reference by
s, then s_w[o].
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, Union

import torch

from .int8_weight import Int8Weight
from .one_pass import operand_codes

_OUTPUT_DTYPES = (torch.float32, torch.bfloat16)
_U8_MAX = 255


class FusableLayer(Protocol):
    """What the fused path reads of an integer layer."""

    weight_shape: tuple[int, ...]
    weight_scale: torch.Tensor
    bias: Optional[torch.Tensor]
    act: torch.nn.Module  # an `ActCodesModule`: qmin, qmax, shared_grid, zero_points_on_grid

    def int8_weight(self) -> Int8Weight: ...


class FusableConv(FusableLayer, Protocol):
    stride: Sequence[int]
    padding: Union[Sequence[int], str]
    dilation: Sequence[int]
    groups: int
    padding_mode: str


def conv_geometry_fits(layer: FusableConv) -> bool:
    """Whether oneDNN's convolution lays out this one: zero padding given as sizes, 2-D or 3-D."""
    return (layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and len(layer.weight_shape) in (4, 5))


def uint8_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                qmax: int, channels_last: bool = False) -> torch.Tensor:
    """The reference path's codes of `x` on one grid, minus `qmin`, as uint8 (one pass)."""
    return operand_codes(x, scale, zero_point, qmin, qmax, qmin, torch.uint8, channels_last)


def fused_operands(layer: FusableLayer, x: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor],
                   conv: bool = False) -> tuple:
    """What oneDNN's fused ops take besides the weight: the uint8 codes (channels-last for a
    convolution), the activation scale and uint8 zero point, the weight scales, the bias."""
    scale, zero_point = grid
    act = layer.act
    u = uint8_codes(x, scale, zero_point, act.qmin, act.qmax, channels_last=conv)
    bias = None if layer.bias is None else layer.bias.float()
    return u, scale.float(), (zero_point - act.qmin).long(), layer.weight_scale.float(), bias


def fused_linear(layer: FusableLayer, packed: torch.Tensor, zeros: torch.Tensor, x: torch.Tensor,
                 grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The Linear on oneDNN's `qlinear_pointwise`, `packed` its prepacked weight."""
    u, scale, zero, weight_scale, bias = fused_operands(layer, x, grid)
    y = torch.ops.onednn.qlinear_pointwise.tensor(u.reshape(-1, x.shape[-1]), scale, zero, packed, weight_scale,
                                                  zeros, bias, 1.0, 0, x.dtype, "none", [], "")
    return y.view(x.shape[:-1] + (y.shape[-1],))


def fused_conv(layer: FusableConv, packed: torch.Tensor, zeros: torch.Tensor, x: torch.Tensor,
               grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The convolution on oneDNN's `qconv_pointwise` (`packed` from `qconv_prepack`), in
    standard strides as the reference's output (the next normalisation then rounds alike)."""
    u, scale, zero, weight_scale, bias = fused_operands(layer, x, grid, conv=True)
    y = torch.ops.onednn.qconv_pointwise.tensor(u, scale, zero, packed, weight_scale, zeros, bias,
                                                list(layer.stride), list(layer.padding), list(layer.dilation),
                                                layer.groups, 1.0, 0, x.dtype, "none", [], "")
    return y.contiguous()


def fusable(layer: FusableLayer) -> bool:
    """The per-layer conditions of the fused path (see the module docstring), but the
    weight's, which `onednn_gemm.exact_for` checks."""
    act = layer.act
    return act.qmax - act.qmin <= _U8_MAX and act.zero_points_on_grid()


def runs_fused(x: torch.Tensor, grid: Optional[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether this call can take the fused path: one grid, an output type oneDNN writes,
    and eager mode (under `torch.compile` the unfused path is traced and fused by inductor)."""
    return grid is not None and x.dtype in _OUTPUT_DTYPES and not torch.compiler.is_compiling()
