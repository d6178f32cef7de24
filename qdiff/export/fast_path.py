"""The fast forward of the integer layers: quantize once, sum exactly, rescale in place.

    y = (sum_k (a - za)(w - zw)) * s_a * s_w + bias

Same numbers as the reference path (`IntLayer.reference_forward`): the same activation
codes (`qdiff.kernels.int8_acts`), the same exact integer sums (a `qdiff.kernels.Kernel`;
convolutions as one int8 matmul over `im2col` patches, or the kernel's own convolution),
and the rescale in the reference's order and dtype, in place. What differs is what is
paid per call: the weights are int8 operands prepared once (`Int8Weight`), not decoded
from packed bytes, and the sum runs on the kernel the registry gives for the layer's
setting and these operands (`qdiff.kernels.candidates`; "auto" times them per shape).
A kernel that fuses the whole layer (`Kernel.fuses`: oneDNN's quantized ops) runs it in
its own ops where the batch shares one activation grid; its rescale rounds once
(s_a * s_w), so it equals the reference up to float rounding. The kernel chosen for a
call shape is remembered on the layer (`IntLayer.chosen`), so a call then pays one
dictionary lookup for the choice.

A convolution whose activation grid varies within a sample (per token: a step size per
input position) has no integer form: the positions of one patch carry different scales.
It runs the reference computation (`ActCodesModule.one_grid_per_sample`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from qdiff.kernels import AUTO, Int8Acts, Kernel, candidates, get_kernel, int8_acts, own_layout, pick
from qdiff.kernels.base import sample_zero
from qdiff.kernels.choice import chosen
from qdiff.kernels.onednn_fused import runs_fused

if TYPE_CHECKING:
    from .int_layers import IntLayer, IntLinear, _IntConv

Grid = tuple[torch.Tensor, torch.Tensor]


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


def _linear_sums(kernel: Kernel, layer: "IntLinear", x: torch.Tensor, acts: Int8Acts) -> torch.Tensor:
    weight = layer.int8_weight()
    a, a_zero = acts.codes.reshape(-1, x.shape[-1]), _rows_zero(acts, x.shape[:-1] + (1,))
    y = kernel.linear(kernel.encode(a, None)[0], a_zero, weight, acts.levels).to(_out_dtype(x))
    y = y.view(x.shape[:-1] + (y.shape[-1],))
    return _rescale_(y, layer, acts.scale, (-1,)).to(x.dtype)


def _conv_sums(kernel: Kernel, layer: "_IntConv", x: torch.Tensor, acts: Int8Acts) -> torch.Tensor:
    y = kernel.conv(layer, acts, _out_dtype(x))
    channels = (1, -1) + (1,) * (x.dim() - 2)
    return _rescale_(y, layer, acts.scale, channels).to(x.dtype)


def _run(kernel: Kernel, layer: "IntLayer", x: torch.Tensor, grid: Optional[Grid], conv: bool,
         acts: Optional[Int8Acts] = None) -> torch.Tensor:
    """The layer's forward on `kernel`: its fused form where it has one for the layer and
    this call, else its sum over `acts` (the call's int8 operands; made here if not given),
    rescaled here."""
    if runs_fused(x, grid) and layer.fuses(kernel, conv):
        return kernel.fused_forward(layer, x, grid, conv)
    acts = acts if acts is not None else int8_acts(layer.act, x, layer.centred_acts())
    return _conv_sums(kernel, layer, x, acts) if conv else _linear_sums(kernel, layer, x, acts)


def _forward(layer: "IntLayer", x: torch.Tensor, conv: bool) -> torch.Tensor:
    """Run the kernel chosen for this call's shape, or choose it (`pick`) and remember it.

    A choice holds for every later call with the same shape, dtype and device whose
    exactness cannot differ: one grid for the whole call, or centred activations (no
    activation zero point). Other calls (samples at different timesteps with zero
    points of their own) ask the kernels whether their sum is exact on every call, as
    traces under `torch.compile` do (nothing is remembered there, which would guard on it).
    """
    grid = layer.act.shared_grid(x)
    key = (x.shape, x.dtype, x.device, grid is not None, layer.kernel)
    static = (grid is not None or layer.centred_acts()) and not torch.compiler.is_compiling()
    name = layer.chosen.get(key) if static else None
    if name is not None:
        return _run(get_kernel(name), layer, x, grid, conv)
    acts = int8_acts(layer.act, x, layer.centred_acts())
    zero = sample_zero(acts) if conv else acts.zero
    weight = layer.int8_weight()
    kernels = candidates(layer.kernel, x.device,
                         lambda kernel: (kernel.supports(weight, acts.levels, zero, conv=layer if conv else None)
                                         and _holds_for(layer, kernel)))
    runs = {kernel.name: (lambda kernel=kernel: _run(kernel, layer, x, grid, conv, acts)) for kernel in kernels}
    pick_key = ("conv" if conv else "linear", layer.weight_shape, *key[:3], acts.zero is None, *runs)
    y = pick(pick_key, runs, x.device)
    if static:
        name = layer.chosen[key] = chosen(pick_key, runs)
        if layer.kernel == AUTO and not own_layout(get_kernel(name)):
            weight.hold_plain()  # a kernel timed after the winner may have repacked it
    return y


def _holds_for(layer: "IntLayer", kernel: Kernel) -> bool:
    """Under "auto", once a layer has chosen (its first call shape), later shapes choose
    among the kernels that read the weight it then kept: one copy, never repacked per call."""
    if layer.kernel != AUTO or not layer.chosen:
        return True
    packed_by = layer.int8_weight().packed_by
    return kernel is packed_by if packed_by is not None else not own_layout(kernel)


def linear_forward(layer: "IntLinear", x: torch.Tensor) -> torch.Tensor:
    return _forward(layer, x, conv=False)


def conv_forward(layer: "_IntConv", x: torch.Tensor) -> torch.Tensor:
    if not layer.act.one_grid_per_sample:
        return layer.reference_forward(x)
    return _forward(layer, x, conv=True)
