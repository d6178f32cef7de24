"""The "onednn-im2col" kernel: convolutions as oneDNN's quantized linear over im2col patches.

oneDNN's quantized convolution ("onednn") is fast on feature maps with many positions,
but on small ones with many channels (a UNet's inner blocks: 1280 channels at 8x8) it
runs several times slower than the same sums as one quantized linear over the patches,
whose rows (batch times positions) then feed the matrix units well. This kernel is
"onednn" with that convolution form: the uint8 codes, written channels-last in their one
pass, are gathered into patches (`im2col`, padded with the zero point's code) and summed
by `qlinear_pointwise` on the weight prepacked as an (O, kernel x C) matrix, the rescale
fused as its epilogue. Linear layers run exactly as on "onednn". "auto" times both forms
per layer and keeps one packed weight, so each convolution runs the faster one.

The sums are exact (int32 in oneDNN; the conditions of `onednn_gemm.exact_for`), and
padding contributes nothing: a padded position holds the zero point's code, which the
op subtracts.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import ConvLayer, Kernel, patches_fit
from .im2col import im2col, out_size
from .int8_acts import Int8Acts
from .onednn_fused import FusableConv, FusableLayer, fused_operands
from .onednn_gemm import OneDNNKernel, Packed
from .registry import register_kernel


def fused_conv_patches(layer: FusableConv, packed: Packed, x: torch.Tensor,
                       grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The convolution as one fused quantized linear over its uint8 patches, in standard
    strides as the reference's output."""
    u, scale, zero, weight_scale, bias = fused_operands(layer, x, grid, conv=True)
    kernel = layer.weight_shape[2:]
    out = [out_size(*args) for args in zip(x.shape[2:], kernel, layer.stride, layer.padding, layer.dilation)]
    fill = zero.to(torch.uint8).expand(x.shape[0])
    patches = im2col(u, kernel, layer.stride, layer.padding, layer.dilation, fill)
    y = torch.ops.onednn.qlinear_pointwise.tensor(patches, scale, zero, packed.weight, weight_scale, packed.zeros,
                                                  bias, 1.0, 0, x.dtype, "none", [], "")
    return y.view(x.shape[0], *out, y.shape[-1]).movedim(-1, 1).contiguous()


@register_kernel("onednn-im2col")
class OneDNNIm2colKernel(OneDNNKernel):
    """"onednn" with convolutions as its quantized linear over im2col patches (one group)."""

    conv_fits = staticmethod(patches_fit)

    def conv(self, layer: ConvLayer, acts: Int8Acts, dtype: torch.dtype) -> torch.Tensor:
        return Kernel.conv(self, layer, acts, dtype)  # im2col, then this kernel's `linear`

    def fused_forward(self, layer: FusableLayer, x: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor],
                      conv: bool) -> torch.Tensor:
        if not conv:
            return super().fused_forward(layer, x, grid, conv)
        return fused_conv_patches(layer, layer.int8_weight().packed_for(self), x, grid)

    def pack(self, matrix: torch.Tensor, conv: Optional[ConvLayer] = None) -> Packed:
        """The matrix prepacked for the quantized linear, also for a convolution (its rows
        are laid out as `im2col`'s patches)."""
        return super().pack(matrix)
