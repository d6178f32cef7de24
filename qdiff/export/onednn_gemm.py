"""Exact sums on oneDNN's quantized linear: uint8 activations x prepacked int8 weights -> float32.

`torch._int_mm` (int8 x int8) is fast where the CPU has VNNI (AVX-512 VNNI, AVX-VNNI);
elsewhere oneDNN runs it on a slow generic path (25-40x slower than float32 on an AVX2
EPYC). PyTorch's x86 quantization kernel, `torch.ops.onednn.qlinear_pointwise`, takes
uint8 activations with a zero point and int8 weights it has prepacked, and has fast AVX2
code (about 2x float32 there). With unit scales its float32 output is the integer sum:

    sum_k (u - zu)(w - zw') with u = a + 128, zu = za' + 128

so it computes exactly what `int8_gemm.int8_sum` does, as long as

- the weights are centred (zw' = 0), which every weight of 7 bits or fewer is;
- one activation zero point serves every row (the kernel takes a scalar): all samples
  at one timestep, or centred activations;
- no pair of products saturates: without VNNI the kernel adds u*w pairwise in int16, so
  2 * 255 * max|w| must stay below 2**15 (weights of 7 bits or fewer: |w| <= 64).

The output is float32: exact for sums below 2**24, and rounded like the int32 sums of
`int8_sum` are when the layer converts them (round to nearest even), above.

Under `torch.compile`, inductor lowers the kernel only when the prepacked weight is a
graph constant, i.e. with its freezing on; without it the compile fails deep inside
inductor, so `onednn_sum` refuses such a trace first, with the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch._inductor.config

if TYPE_CHECKING:
    from .int8_weight import Int8Weight

_INT16_MAX = 2**15 - 1
_U8_MAX = 255
SHIFT = 128  # int8 -> uint8: a + 128, the same bits with the sign bit flipped


_BUILT = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


def available(device: torch.device) -> bool:
    """Whether PyTorch has oneDNN's quantized linear for `device` (CPU builds with oneDNN)."""
    return device.type == "cpu" and _BUILT


def exact_for(weight: "Int8Weight", a_zero: Optional[torch.Tensor]) -> bool:
    """Whether the oneDNN sum equals `int8_sum` for this weight and these activation zero
    points (any shape: per row or per sample)."""
    if not weight.centred or 2 * _U8_MAX * weight.max_abs > _INT16_MAX:
        return False
    return a_zero is None or bool(a_zero.min() == a_zero.max())


def prepack(matrix: torch.Tensor) -> torch.Tensor:
    """oneDNN's opaque copy of the (N, K) int8 matrix, for any number of rows."""
    return torch.ops.onednn.qlinear_prepack(matrix, None)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The (N, K) int8 matrix back from `prepack`'s copy (exact)."""
    return packed.to_dense().t()


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


def onednn_sum(u: torch.Tensor, a_zero: Optional[torch.Tensor], weight: "Int8Weight") -> torch.Tensor:
    """sum_k (a - za')(w' - zw') as (M, N) float32, for `u = shifted(a)` (M, K) uint8 and
    `a_zero` (M,) the rows' residual zero point (equal: see `exact_for`) or None."""
    if torch.compiler.is_compiling() and not torch._inductor.config.freezing:
        _refuse_unfrozen_compile()
    zero = SHIFT if a_zero is None else SHIFT + int(a_zero[0])
    ones, zeros = weight.unit_scales()
    return torch.ops.onednn.qlinear_pointwise(u, 1.0, zero, weight.onednn_packed(), ones, zeros, None,
                                              1.0, 0, torch.float32, "none", [], "")
