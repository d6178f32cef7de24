"""Exported integer layers: packed weight codes, per-channel scales, activation tables.

    y = s_a(t) * s_w[o] * sum_k (a_k - za)(w_ok - zw_o) + bias[o]

The integer sum is exact (see `int_ops`); one float multiply rescales it. Two ways to
compute it, chosen by the layer's `kernel` setting (see `qdiff.kernels.registry`):

- "reference": the weights stay packed and are unpacked inside `forward` only, so no
  float (or unpacked) copy of them lives between calls; slow, and the yardstick;
- "auto" or a registered kernel (`fast_path`, `qdiff.kernels`): on the first call the
  packed codes become an int8 matrix (`Int8Weight`) and the packed bytes are dropped, so
  the layer holds one copy of its codes either way; `state_dict()` packs them again.

A Linear whose per-token activations are quantized in channel groups has a step size
per token and group, which no single integer sum can factor out: it runs
`IntLinear.grouped_forward` (dequantized activations times integer weights) instead.

Convolutions keep the geometry of the module they replace (stride, padding, ...) as
plain attributes: it comes from the model's config, not from the file.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from qdiff.kernels import REFERENCE, Int8Weight, Kernel, check_kernel, default_kernel, int8_offset, prepare
from qdiff.kernels.float_sum import centred_weight
from qdiff.quant.primitives import int_range
from qdiff.quant.rotation import HadamardRotation

from .act_codes import ActCodes, ActCodesModule, centres_codes
from .fast_path import conv_forward, linear_forward
from .fixed_dtype import FixedDtypeBuffers
from .format import LayerSpec
from .int_ops import exact_conv, int_linear
from .packing import pack_dense, packed_numel, unpack_dense


class IntLayer(FixedDtypeBuffers):
    """Shared storage and weight decoding; subclasses say how the integer sum is formed.
    Its buffers (codes, weight scales) keep their dtype when the model is cast; the bias,
    a float part, follows it."""

    float_type: type = nn.Module

    def __init__(self, spec: LayerSpec, act: ActCodesModule, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.spec = spec
        self.weight_shape = spec.weight_shape
        self.weight_qmin, _ = int_range(spec.weight_bits, spec.weight_symmetric)
        numel = math.prod(spec.weight_shape)
        out = spec.weight_shape[0]
        self.register_buffer("weight_packed", torch.zeros(packed_numel(numel, spec.weight_bits),
                                                          dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out))
        self.register_buffer("weight_zero_point", torch.zeros(out, dtype=torch.int16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act = act
        self.kernel = default_kernel()
        self.int8: Optional[Int8Weight] = None  # the codes while a fast kernel holds them
        self._forget_choices()

    def _forget_choices(self) -> None:
        """Forget what depends on the codes and tables: the kernel chosen per call shape
        (`fast_path`), which kernels fuse the layer, whether the activations are centred."""
        self.chosen: dict[tuple, str] = {}
        self._fused_by: dict[str, bool] = {}
        self._centred_acts: Optional[bool] = None

    def fuses(self, kernel: Kernel, conv: bool) -> bool:
        """Whether `kernel` runs this layer fused (`Kernel.fuses`, asked once)."""
        fused = self._fused_by.get(kernel.name)
        if fused is None:
            fused = self._fused_by[kernel.name] = kernel.fuses(self, conv)
        return fused

    @torch.no_grad()
    def set_weight(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store integer codes (shape `weight_shape`) with their per-channel grid."""
        self.int8 = None
        self._forget_choices()
        self.weight_packed = pack_dense(codes, self.spec.weight_bits, self.weight_qmin)
        self.weight_scale = scale.detach().float().clone()
        self.weight_zero_point = zero_point.detach().round().to(torch.int16)

    def set_kernel(self, kernel: str) -> None:
        """Switch kernels; the codes move between packed bytes and int8 operands, exactly."""
        self.kernel = check_kernel(kernel)
        self.chosen = {}
        if kernel != REFERENCE:
            prepare(kernel, self.int8_weight())
        elif self.int8 is not None:
            self.weight_packed = self._packed_codes()
            self.int8 = None

    @torch.no_grad()
    def int8_weight(self) -> Int8Weight:
        """The int8 operand (built from the packed codes on first use, which are then dropped)."""
        if self.int8 is None:
            codes = self.weight_codes()
            self.int8 = Int8Weight.from_codes(codes, self.weight_zero_point, self.spec.weight_bits,
                                              self.weight_qmin)
            self.weight_packed = self.weight_packed.new_empty(0)
        return self.int8

    def centred_acts(self) -> bool:
        """Whether the activation codes minus their zero point fit int8 (see `centres_codes`)."""
        if self._centred_acts is None:
            self._centred_acts = centres_codes(self.act)
        return self._centred_acts

    def _packed_codes(self) -> torch.Tensor:
        return pack_dense(self.weight_codes(), self.spec.weight_bits, self.weight_qmin)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.int8 is not None:  # the file format holds packed codes, whatever the kernel
            destination[prefix + "weight_packed"] = self._packed_codes()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        # new codes arrive packed; the int8 operand is rebuilt from them. A partial load without
        # them (strict=False: PEFT loading a LoRA's weights) leaves the codes as they are.
        if self.int8 is not None and prefix + "weight_packed" in state_dict:
            numel = packed_numel(math.prod(self.weight_shape), self.spec.weight_bits)
            self.weight_packed = self.weight_packed.new_zeros(numel)
            self.int8 = None
        self._forget_choices()
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes (empty while a fast kernel holds them as int8), under the name PEFT
        reads a quantized layer's weight by (GPTQ's): PEFT takes only its device (`export.lora`)."""
        return self.weight_packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference_forward(x) if self.kernel == REFERENCE else self.fast_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_codes(self) -> torch.Tensor:
        """The integer codes, int16, shape `weight_shape` (decoded for one call)."""
        if self.int8 is not None:
            return self.int8.codes(self.weight_zero_point, self.weight_shape)
        numel = math.prod(self.weight_shape)
        flat = unpack_dense(self.weight_packed, self.spec.weight_bits, self.weight_qmin, numel)
        return flat.view(self.weight_shape)

    def _rescale(self, acc: torch.Tensor, x: torch.Tensor, channel_shape: tuple[int, ...],
                 act_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """acc (* s_a) * s_w + bias in at least float32, returned in the input's dtype."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = acc.to(dtype)
        if act_scale is not None:
            y = y * act_scale.to(dtype)
        y = y * self.weight_scale.view(channel_shape).to(dtype)
        if self.bias is not None:
            y = y + self.bias.view(channel_shape).to(dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"w{self.spec.weight_bits}a{self.spec.act_bits}, shape={tuple(self.weight_shape)}, "
                f"act={self.spec.act_granularity}, kernel={self.kernel}")


class IntLinear(IntLayer):
    """With `spec.input_rotation == "hadamard"` the input is rotated (x @ H) first, by the
    student's own `HadamardRotation` (rebuilt from the width, nothing stored)."""

    float_type = nn.Linear

    def __init__(self, spec: LayerSpec, act: ActCodesModule, bias: Optional[torch.Tensor]) -> None:
        super().__init__(spec, act, bias)
        self.input_rotation = (HadamardRotation(spec.weight_shape[1])
                               if spec.input_rotation == "hadamard" else None)

    @classmethod
    def like(cls, module: nn.Linear, spec: LayerSpec, act: ActCodesModule) -> "IntLinear":
        return cls(spec, act, module.bias)

    # what pipelines read of their denoiser's layers (SDXL: add_embedding.linear_1.in_features)
    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        if self.spec.act_group_size:
            return self.grouped_forward(x)
        return super().forward(x)

    def grouped_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token activations in channel groups (`spec.act_group_size`), on every kernel.

        A step size per token and group cannot leave the sum over the input channels, so
        the activations enter dequantized and the weights as exact integers, in one float
        matmul; the result is the student's up to float rounding (as a per-token
        convolution's). Block-scaled 4-bit tensor cores (NVFP4, MX) likewise scale each
        block's products in float. Slicing the input per group instead (format version 4)
        keeps every sum integer but runs one matmul per group, each too thin to be fast.
        """
        act: ActCodes = self.act(x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        values = (act.codes - act.zero_point).mul_(act.scale).to(dtype)
        if self.kernel == REFERENCE:
            weight = self.weight_codes().to(dtype) - self.weight_zero_point[:, None].to(dtype)
        else:
            weight = centred_weight(self.int8_weight(), dtype)
        return self._rescale(F.linear(values, weight), x, (-1,))

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(self, x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        act: ActCodes = self.act(x)
        rows = x.shape[:-1] + (1,)
        a_zero = act.zero_point.expand(rows).reshape(-1)
        acc = int_linear(act.codes.reshape(-1, x.shape[-1]), a_zero,
                         int8_offset(self.spec.act_bits, self.act.qmin),
                         self.weight_codes(), self.weight_zero_point,
                         int8_offset(self.spec.weight_bits, self.weight_qmin))
        act_scale = act.scale.expand(rows).reshape(-1, 1)
        y = self._rescale(acc, x, (1, -1), act_scale)
        return y.view(x.shape[:-1] + (y.shape[-1],))


class _IntConv(IntLayer):
    """Convolution on zero-point-centred codes; padding modes as in `nn.Conv*d`."""

    conv_fn: staticmethod  # F.conv2d or F.conv3d
    _GEOMETRY = ("stride", "padding", "dilation", "groups", "padding_mode",
                 "_reversed_padding_repeated_twice")

    @classmethod
    def like(cls, module: nn.Module, spec: LayerSpec, act: ActCodesModule) -> "_IntConv":
        layer = cls(spec, act, module.bias)
        for name in cls._GEOMETRY:
            setattr(layer, name, getattr(module, name))
        return layer

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self.conv_fn(x, weight, None, self.stride, 0, self.dilation, self.groups)
        return self.conv_fn(x, weight, None, self.stride, self.padding, self.dilation, self.groups)

    def fast_forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_forward(self, x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        act: ActCodes = self.act(x)
        channels = (1, -1) + (1,) * (x.dim() - 2)
        per_filter = (-1,) + (1,) * (x.dim() - 1)
        weight = self.weight_codes().int() - self.weight_zero_point.view(per_filter).int()
        centred = act.codes - act.zero_point
        if act.scale.shape[1:] == (1,) * (x.dim() - 1):  # one step size per sample
            acc = exact_conv(self._conv, centred, weight)
            return self._rescale(acc, x, channels, act.scale)
        # A step size per position (per-token activations; with channel groups, per position
        # and group) cannot leave the sum: the activations enter dequantized, the weights as
        # exact integers (float rounding).
        dtype = torch.promote_types(x.dtype, torch.float32)
        acc = self._conv((centred * act.scale).to(dtype), weight.to(dtype))
        return self._rescale(acc, x, channels)


class IntConv2d(_IntConv):
    float_type = nn.Conv2d
    conv_fn = staticmethod(F.conv2d)


class IntConv3d(_IntConv):
    float_type = nn.Conv3d
    conv_fn = staticmethod(F.conv3d)


INT_LAYERS: dict[str, type[IntLayer]] = {"Linear": IntLinear, "Conv2d": IntConv2d,
                                        "Conv3d": IntConv3d}
