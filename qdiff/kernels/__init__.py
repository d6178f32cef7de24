"""Kernels: the exact integer sums of the exported layers, and which one runs.

`qdiff.export` holds the file format and the integer layer modules; the layers prepare
their operands once (`Int8Weight`) and per call (`int8_acts`), and ask the registry which
`Kernel` sums them. Every kernel gives the layers' reference path's numbers (exact
integer sums); they differ in speed only.

    from qdiff.kernels import Kernel, register_kernel

    @register_kernel("mine")          # then model.set_qdiff_kernel("mine"), or QDIFF_KERNEL=mine
    class Mine(Kernel):
        def linear(self, a, a_zero, weight, levels): ...

Layout: `base` (the `Kernel` protocol), `registry` (names, the `QDIFF_KERNEL` default,
what "auto" runs), `choice` (timing per shape), the operands (`int8_weight`, `int8_acts`,
`im2col`), and one file per built-in kernel: `int8_gemm` ("int8", `torch._int_mm`),
`onednn_gemm` ("onednn", oneDNN's quantized linear and convolution; `onednn_fused`, its
whole-layer form), `onednn_im2col` ("onednn-im2col", convolutions as that linear over
patches), `float_sum` ("float", the fallback); `one_pass` quantizes large activations in
one compiled loop.
"""

from .base import Kernel, int8_fits
from .choice import choices, clear_choices, pick
from .int8_acts import Int8Acts, int8_acts
from .int8_weight import Int8Weight, int8_offset
from .registry import (AUTO, ENV_VAR, FALLBACK, REFERENCE, UnknownKernelError, available_kernels,
                       candidates, check_kernel, default_kernel, get_kernel, kernel_names, own_layout,
                       prepare, register_kernel, unregister_kernel)

# The built-in kernels register on import, in this order ("auto" measures its candidates in it).
# isort: off
from . import int8_gemm  # noqa: F401,E402
from . import onednn_gemm  # noqa: F401,E402
from . import onednn_im2col  # noqa: F401,E402
from . import float_sum  # noqa: F401,E402
# isort: on

__all__ = [
    "AUTO", "ENV_VAR", "FALLBACK", "REFERENCE", "Int8Acts", "Int8Weight", "Kernel", "UnknownKernelError",
    "available_kernels", "candidates", "check_kernel", "choices", "clear_choices", "default_kernel",
    "get_kernel", "int8_acts", "int8_fits", "int8_offset", "kernel_names", "own_layout", "pick",
    "prepare", "register_kernel", "unregister_kernel",
]
