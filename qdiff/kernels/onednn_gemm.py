"""The "onednn" kernel: exact sums on oneDNN's quantized linear, uint8 activations x
prepacked int8 weights -> float32.

`torch._int_mm` (int8 x int8) is fast where the CPU has VNNI (AVX-512 VNNI, AVX-VNNI);
elsewhere oneDNN runs it on a slow generic path. PyTorch's x86 quantization kernel,
`torch.ops.onednn.qlinear_pointwise`, takes uint8 activations with a zero point and int8
weights it has prepacked, and has fast AVX2 code. With unit scales its float32 output is
the integer sum:

    sum_k (u - zu)(w - zw') with u = a + 128, zu = za' + 128

so it computes exactly what `int8_gemm.int8_sum` does, as long as

- the weights are centred (zw' = 0), which every weight of 7 bits or fewer is;
- one activation zero point serves every row (the kernel takes a scalar): all samples
  at one timestep, or centred activations;
- no pair of products saturates: without VNNI the kernel adds u*w pairwise in int16, so
  2 * 255 * max|w| must stay below 2**15 (weights of 7 bits or fewer: |w| <= 64).

The output is float32: exact for sums below 2**24, and rounded like the int32 sums of
`int8_sum` are when the layer converts them (round to nearest even), above.

The layer holds oneDNN's prepacked copy instead of the plain matrix (`Int8Weight.packed_for`),
made on the first call that runs this kernel (not when a layer is set to it: a layer
whose sums it cannot give never holds it). A convolution runs on oneDNN's quantized
convolution (`qconv_pointwise`, its weight prepacked as such), with no `im2col` patches.
Where the batch shares one activation grid, the kernel runs the whole layer fused
(`fuse`, see `onednn_fused`): quantization in one pass, the rescale as the op's epilogue.

Under `torch.compile`, inductor lowers the kernel only when the prepacked weight is a
graph constant, i.e. with its freezing on; without it the compile fails deep inside
inductor, so `onednn_sum` refuses such a trace first, with the fix.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch._inductor.config

from .base import ConvLayer, Kernel, int8_fits, sample_zero
from .int8_acts import Int8Acts
from .int8_weight import Int8Weight, from_rows, to_rows
from .onednn_fused import FusableLayer, conv_geometry_fits, fusable, fused_conv, fused_linear
from .registry import register_kernel

_INT16_MAX = 2**15 - 1
_U8_MAX = 255
SHIFT = 128  # int8 -> uint8: a + 128, the same bits with the sign bit flipped


_BUILT = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def available(device: torch.device) -> bool:
    """Whether PyTorch has oneDNN's quantized linear for `device` (CPU builds with oneDNN)."""
    return device.type == "cpu" and _BUILT


def exact_for(weight: Int8Weight, a_zero: Optional[torch.Tensor]) -> bool:
    """Whether the oneDNN sum equals `int8_sum` for this weight and these activation zero
    points (any shape: per row or per sample)."""
    if not weight.centred or 2 * _U8_MAX * weight.max_abs > _INT16_MAX:
        return False
    return a_zero is None or bool(a_zero.min() == a_zero.max())


class Packed(NamedTuple):
    """oneDNN's copy of a weight, with the unit scales and zero zero points that make its
    op return bare integer sums."""

    weight: torch.Tensor
    ones: torch.Tensor
    zeros: torch.Tensor


def prepack(matrix: torch.Tensor) -> torch.Tensor:
    """oneDNN's opaque copy of the (N, K) int8 matrix, for any number of rows."""
    return torch.ops.onednn.qlinear_prepack(matrix, None)


def prepack_conv(matrix: torch.Tensor, conv: ConvLayer) -> torch.Tensor:
    """oneDNN's opaque copy of a convolution's weight (rows as `to_rows` lays them out)."""
    weight = from_rows(matrix, conv.weight_shape)
    return torch.ops.onednn.qconv_prepack(weight, torch.ones(weight.shape[0]), 1.0, 0, list(conv.stride),
                                          list(conv.padding), list(conv.dilation), conv.groups, None)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The (N, K) int8 matrix back from `prepack`'s or `prepack_conv`'s copy (exact)."""
    dense = packed.to_dense()
    return dense.t() if dense.dim() == 2 else to_rows(dense)


def shifted(a: torch.Tensor) -> torch.Tensor:
    """int8 -> uint8 `a + 128` (the sign bit flipped), the activation operand of `onednn_sum`."""
    return a.view(torch.uint8) ^ SHIFT


@torch.compiler.disable  # runs eagerly, so the error reaches the caller instead of a graph break
def _refuse_unfrozen_compile() -> None:
    raise RuntimeError(
        "torch.compile of qdiff's oneDNN kernel needs inductor's freezing, which makes the prepacked "
        "weights graph constants: set `torch._inductor.config.freezing = True` before the first "
        "compiled call (which must run under torch.no_grad() or torch.inference_mode(), as pipelines "
        "do), or compile another kernel: `pipe.unet.set_qdiff_kernel(\"int8\")`.")


def _check_compile() -> None:
    if torch.compiler.is_compiling() and not torch._inductor.config.freezing:
        _refuse_unfrozen_compile()


def onednn_sum(u: torch.Tensor, a_zero: Optional[torch.Tensor], packed: Packed) -> torch.Tensor:
    """sum_k (a - za')(w' - zw') as (M, N) float32, for `u = shifted(a)` (M, K) uint8,
    `a_zero` (M,) the rows' residual zero point (equal: see `exact_for`) or None, and the
    weight as `OneDNNKernel.pack` holds it."""
    _check_compile()
    zero = SHIFT if a_zero is None else SHIFT + int(a_zero[0])
    return torch.ops.onednn.qlinear_pointwise(u, 1.0, zero, packed.weight, packed.ones, packed.zeros, None,
                                              1.0, 0, torch.float32, "none", [], "")


def onednn_conv_sum(u: torch.Tensor, zero: Optional[torch.Tensor], packed: Packed,
                    conv: ConvLayer) -> torch.Tensor:
    """The convolution's sums (B, O, *out) as float32 in standard strides, for `u` the
    shifted codes (B, C, *in) and `zero` the samples' residual zero point (equal) or None."""
    _check_compile()
    shift = SHIFT if zero is None else SHIFT + int(zero[0])
    y = torch.ops.onednn.qconv_pointwise(u, 1.0, shift, packed.weight, packed.ones, packed.zeros, None,
                                         list(conv.stride), list(conv.padding), list(conv.dilation),
                                         conv.groups, 1.0, 0, torch.float32, "none", [], "")
    return y.contiguous()


@register_kernel("onednn")
class OneDNNKernel(Kernel):
    """oneDNN's quantized linear (CPU), for weights of 7 bits or fewer and one activation
    zero point per call; fast on AVX2 CPUs without VNNI."""

    auto_candidate = True

    def available(self, device: torch.device) -> bool:
        return available(device)

    def prepare(self, weight: Int8Weight) -> None:
        """Nothing yet: the weight is prepacked on the first call this kernel runs."""

    conv_fits = staticmethod(conv_geometry_fits)  # the convolutions this kernel lays out

    def supports(self, weight: Int8Weight, levels: int, zero: Optional[torch.Tensor],
                 conv: Optional[ConvLayer] = None) -> bool:
        if conv is not None and not self.conv_fits(conv):
            return False
        return int8_fits(weight.shape[1], levels, weight) and exact_for(weight, zero)

    def encode(self, codes: torch.Tensor,
               zero: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        fill = torch.full((codes.shape[0],), SHIFT) if zero is None else zero + SHIFT
        return shifted(codes), fill

    def linear(self, a: torch.Tensor, a_zero: Optional[torch.Tensor], weight: Int8Weight,
               levels: int) -> torch.Tensor:
        return onednn_sum(a, a_zero, weight.packed_for(self))

    def conv(self, layer: ConvLayer, acts: Int8Acts, dtype: torch.dtype) -> torch.Tensor:
        packed = layer.int8_weight().packed_for(self, layer)
        return onednn_conv_sum(shifted(acts.codes), sample_zero(acts), packed, layer).to(dtype)

    def fuses(self, layer: FusableLayer, conv: bool) -> bool:
        levels = layer.act.qmax - layer.act.qmin
        return fusable(layer) and self.supports(layer.int8_weight(), levels, None, layer if conv else None)

    def fused_forward(self, layer: FusableLayer, x: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor],
                      conv: bool) -> torch.Tensor:
        packed = layer.int8_weight().packed_for(self, layer if conv else None)
        return (fused_conv if conv else fused_linear)(layer, packed.weight, packed.zeros, x, grid)

    def pack(self, matrix: torch.Tensor, conv: Optional[ConvLayer] = None) -> Packed:
        """The prepacked matrix (as a convolution's weight for `conv`), with the per-channel
        scale 1.0 and zero point 0 that make oneDNN return the bare integer sums."""
        channels = matrix.shape[0]
        weight = prepack(matrix) if conv is None else prepack_conv(matrix, conv)
        return Packed(weight, torch.ones(channels), torch.zeros(channels, dtype=torch.long))

    def unpack(self, packed: Packed) -> torch.Tensor:
        return unpack(packed.weight)

