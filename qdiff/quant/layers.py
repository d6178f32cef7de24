"""Quantized Linear / Conv2d / Conv3d layers with QALoRA and the optional aux branch.

    y = Q_a(x) * Q_w(W0 + B @ A) + bias   [+ Q_a(x) * Phi]

A Linear may rotate its input first (`rotate_input`, see `rotation`): x becomes x @ H
and W0 becomes W0 @ H at wrapping time, so LoRA, Phi and both quantizers live in the
rotated basis and the float function is unchanged.

The original module is kept as `base_layer` (as PEFT does) for its bias and conv
hyper-parameters; W0 stays frozen, either as a float tensor or, with
`packed_base_weight`, as packed integer codes of an initial quantization (the student
then costs a fraction of the teacher's memory). Because B @ A is added *before* the
weight quantizer, LoRA merges away without changing the quantized output (EfficientDM).
With `lora.low_rank_backward` and frozen weight step sizes, Linear and ungrouped Conv2d
layers give B and A their gradients without forming the full weight gradient
(`lora_backward`).
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from qdiff.config import AuxConfig, LoRAConfig, QuantConfig

from .act_quantizer import ActQuantizer, act_quantizer_class
from .aux_branch import AuxBranch
from .lora_backward import Conv2dGradOps, GradOps, LinearGradOps, LowRankLoRAFunction
from .packing import pack_codes, unpack_codes
from .rotation import HadamardRotation
from .split_act_quantizer import SplitActQuantizer
from .timestep_context import TimestepContext
from .weight_quantizer import WeightQuantizer, weight_quantizer_class


class QuantLayer(nn.Module):
    """Shared machinery; subclasses say how a weight is applied and where channels live."""

    base_type: type = nn.Module
    channel_dim: int = -1  # feature dim of the input (per-token quantization spans it)

    def __init__(self, base_layer: nn.Module, weight_bits: int, act_bits: int,
                 quant_cfg: QuantConfig, lora_cfg: Optional[LoRAConfig] = None,
                 aux_cfg: Optional[AuxConfig] = None,
                 context: Optional[TimestepContext] = None, rotate_input: bool = False) -> None:
        super().__init__()
        self.input_rotation: Optional[HadamardRotation] = None
        if rotate_input:
            self._rotate_base(base_layer)
        weight = base_layer.weight.detach()
        self.weight_shape = tuple(weight.shape)
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.context = context or TimestepContext()
        self.weight_quantizer: WeightQuantizer = weight_quantizer_class(quant_cfg.weight_mode).from_config(
            quant_cfg, out_channels=weight.shape[0], bits=weight_bits).to(weight.device)
        self.weight_quantizer.init_from(weight, quant_cfg.weight_init, quant_cfg.lp_norm)
        self.base_layer = base_layer.requires_grad_(False)
        self.act_quantizer: Union[ActQuantizer, SplitActQuantizer] = self._make_act_quantizer(
            act_bits, quant_cfg, self.weight_shape[1]).to(weight.device)
        self.packed = quant_cfg.packed_base_weight
        if self.packed:
            self._pack_base(weight, self.weight_quantizer)
            base_layer.weight = None
        self.merged = False
        self._init_lora(weight, lora_cfg)
        self.aux: Optional[AuxBranch] = None
        if aux_cfg is not None and aux_cfg.enabled:
            error = weight.float() - self.weight_quantizer(weight.float()).detach()
            self.aux = AuxBranch.from_error(error, aux_cfg.rank).to(weight.dtype)

    @classmethod
    def from_module(cls, module: nn.Module, weight_bits: int, act_bits: int,
                    quant_cfg: QuantConfig, lora_cfg: Optional[LoRAConfig] = None,
                    aux_cfg: Optional[AuxConfig] = None,
                    context: Optional[TimestepContext] = None,
                    rotate_input: bool = False) -> "QuantLayer":
        """Wrap `module` (its weight initialises the weight quantizer and Phi)."""
        if type(module) is not cls.base_type:
            raise TypeError(f"{cls.__name__} wraps {cls.base_type.__name__}, got {type(module).__name__}.")
        return cls(module, weight_bits, act_bits, quant_cfg, lora_cfg, aux_cfg, context, rotate_input)

    @torch.no_grad()
    def _rotate_base(self, base_layer: nn.Module) -> None:
        """W0 <- W0 @ H (each row rotated), and the rotation kept for the input."""
        if self.base_type is not nn.Linear:
            raise ValueError(f"Cannot rotate the input of {base_layer}: qdiff rotates the inputs "
                             f"of Linear layers only; leave it out of quant.rotate_inputs.")
        weight = base_layer.weight
        rotation = HadamardRotation(weight.shape[1]).to(weight.device)
        base_layer.weight = nn.Parameter(rotation(weight.float()).to(weight.dtype), requires_grad=False)
        self.input_rotation = rotation

    def _make_act_quantizer(self, bits: int, cfg: QuantConfig, width: int) -> ActQuantizer:
        """The quantizer of an input (slice) of `width` channels, of the class registered
        under `cfg.act_mode`."""
        cls = act_quantizer_class(cfg.act_mode)
        group_size = self._act_group_size(cfg.act_group_size, width) if cls.channel_groups else 0
        return cls.from_config(cfg, bits=bits, context=self.context, channel_dim=self.channel_dim,
                               group_size=group_size)

    def act_quantizers(self) -> list[ActQuantizer]:
        """The activation quantizers of the input: one, or one per slice of `act_split`."""
        quantizer = self.act_quantizer
        return list(quantizer.parts) if self.act_split else [quantizer]

    def _act_group_size(self, group_size: int, width: int) -> int:
        """`group_size`, or 0 (one grid per token) where the input is no wider than a group.
        `width` is the weight's input width: a grouped convolution's input is `groups` times it."""
        conv_groups = getattr(self.base_layer, "groups", 1)
        if group_size == 0 or width * conv_groups <= group_size:
            return 0
        if conv_groups != 1:
            raise ValueError(f"Cannot quantize the input of the grouped {self.base_layer} in channel "
                             f"groups (quant.act_group_size={group_size}): the export computes a "
                             f"grouped input as one layer per slice, which a grouped convolution is "
                             f"not. Keep it out of quantization (quant.exclude) or set act_group_size=0.")
        if width % group_size:
            raise ValueError(f"Cannot quantize the {width}-channel input of {self.base_layer} in "
                             f"groups of quant.act_group_size={group_size}: {width} is not a "
                             f"multiple of it. Pick a group size that divides the model's widths, "
                             f"or keep this layer out of quantization (quant.exclude).")
        return group_size

    def split_input(self, widths: Sequence[int], cfg: QuantConfig) -> None:
        """Quantize the input in channel slices of `widths` (e.g. a concatenation's parts),
        each slice with its own activation quantizer; see `SplitActQuantizer`."""
        if self.input_rotation is not None:
            raise ValueError(f"Cannot split the rotated input of {self.base_layer}: the rotation "
                             f"mixes the slices; rotate the input or split it, not both.")
        if getattr(self.base_layer, "groups", 1) != 1:
            raise ValueError(f"Cannot split the input of the grouped {self.base_layer}: a grouped "
                             f"layer does not sum over all its input channels; leave it unsplit.")
        in_channels = self.weight_shape[1]
        if sum(widths) != in_channels:
            raise ValueError(f"Cannot split the input of {self.base_layer} into channel slices "
                             f"{list(widths)}: they add up to {sum(widths)}, not its {in_channels} "
                             f"input channels.")
        device = self.weight_quantizer.device
        parts = [self._make_act_quantizer(self.act_bits, cfg, width).to(device) for width in widths]
        if len({part.group_size for part in parts}) > 1:
            raise ValueError(f"Cannot quantize the input slices {list(widths)} of {self.base_layer} in "
                             f"channel groups of quant.act_group_size={cfg.act_group_size}: a slice no "
                             f"wider than a group keeps one grid per token, and one exported layer "
                             f"cannot mix that with grouped slices. Pick a group size below the "
                             f"narrowest slice ({min(widths)}), or act_group_size=0.")
        self.act_quantizer = SplitActQuantizer(parts, widths, self.channel_dim)

    @property
    def act_split(self) -> tuple[int, ...]:
        """The channel widths of the input's slices (`split_input`); () for one quantizer."""
        quantizer = self.act_quantizer
        return quantizer.widths if isinstance(quantizer, SplitActQuantizer) else ()

    def _init_lora(self, weight: torch.Tensor, cfg: Optional[LoRAConfig]) -> None:
        """A (rank, in/groups, *kernel) kaiming-uniform, B (out, rank) zero: B @ A = 0 at start."""
        self.lora_A: Optional[nn.Parameter] = None
        self.lora_B: Optional[nn.Parameter] = None
        self.low_rank_backward = False
        if cfg is None or not cfg.enabled:
            return
        self.low_rank_backward = cfg.low_rank_backward and self.grad_ops() is not None
        rank = min(cfg.rank, weight.shape[0], weight[0].numel())
        lora_a = weight.new_empty((rank,) + tuple(weight.shape[1:]))
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(lora_a)
        self.lora_B = nn.Parameter(weight.new_zeros(weight.shape[0], rank))

    @torch.no_grad()
    def _pack_base(self, weight: torch.Tensor, quantizer: WeightQuantizer) -> None:
        """Store `weight` as packed codes on `quantizer`'s current grid (frozen copies of its
        per-channel s, zp: `export_params`)."""
        codes = pack_codes(quantizer.codes(weight), quantizer.bits, quantizer.qmin)
        scale, zero_point = quantizer.export_params()
        self.register_buffer("base_codes", codes)
        self.register_buffer("base_scale", scale.clone())
        self.register_buffer("base_zero_point", zero_point.clone())
        self.base_dtype = weight.dtype

    def base_weight(self) -> torch.Tensor:
        """The frozen W0 as a float tensor (dequantized on the fly when packed)."""
        if not self.packed:
            return self.base_layer.weight
        quantizer = self.weight_quantizer
        codes = unpack_codes(self.base_codes, quantizer.bits, quantizer.qmin, self.weight_shape)
        shape = (-1,) + (1,) * (len(self.weight_shape) - 1)
        weight = (codes.float() - self.base_zero_point.view(shape)) * self.base_scale.view(shape)
        return weight.to(self.base_dtype)

    def get_delta_weight(self) -> torch.Tensor:
        """B @ A reshaped to the weight's shape (zeros without LoRA)."""
        if self.lora_A is None:
            return torch.zeros(self.weight_shape, device=self.weight_quantizer.device)
        return (self.lora_B @ self.lora_A.flatten(1)).view(self.weight_shape)

    def adapted_weight(self) -> torch.Tensor:
        """W0 + B @ A, what the weight quantizer sees (W0 alone without LoRA or once merged)."""
        weight = self.base_weight()
        if self.lora_A is None or self.merged:
            return weight
        # one pass, without a separate B @ A tensor (a fresh tensor: the low-rank backward
        # quantizes it in place)
        return torch.addmm(weight.flatten(1), self.lora_B, self.lora_A.flatten(1)).view(self.weight_shape)

    def quantized_weight(self) -> torch.Tensor:
        """Q_w(W0 + B @ A), the weight the layer actually applies."""
        weight = self.adapted_weight()
        return self.weight_quantizer(weight).to(weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        x_q = self.act_quantizer(x)
        if self._uses_low_rank_backward():
            y = LowRankLoRAFunction.apply(x_q, self.lora_B, self.lora_A, self)
        else:
            y = self._apply_weight(x_q, self.quantized_weight(), self.base_layer.bias)
        if self.aux is not None:
            y = y + self._apply_aux(x_q)
        return y

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _uses_low_rank_backward(self) -> bool:
        """Only LoRA may take gradients here: a trained step size, zero point, bias or W0
        needs the full weight gradient, so autograd's path serves those (same values)."""
        bias = self.base_layer.bias
        return (self.low_rank_backward and torch.is_grad_enabled() and not self.merged
                and self.lora_A.requires_grad and self.lora_B.requires_grad
                and not self.weight_quantizer.trains()
                and not (bias is not None and bias.requires_grad)
                and (self.packed or not self.base_layer.weight.requires_grad))

    def grad_ops(self) -> Optional[GradOps]:
        """The gradient products the low-rank backward needs (None: not supported here)."""
        return None

    def _apply_aux(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_weight(x, self.aux.weight().view(self.weight_shape), None)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B @ A into W0; LoRA stays (inactive) so `unmerge` can undo it. Output unchanged."""
        if self.lora_A is None or self.merged:
            return
        if self.packed:  # re-encode on the trained grid: Q_w of the codes is the codes
            merged = self.adapted_weight()
            self._pack_base(merged, self.weight_quantizer)
        else:
            self.base_layer.weight += self.get_delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract B @ A again (float base only: packed codes lost the unrounded sum)."""
        if not self.merged:
            return
        if self.packed:
            raise NotImplementedError("unmerge() needs a float base weight; packed codes are rounded.")
        self.base_layer.weight -= self.get_delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    @torch.no_grad()
    def to_module(self) -> nn.Module:
        """A plain float module whose weight is Q_w(W0 + B @ A), rotated back to the input's
        own basis if the input is rotated (the activation quantizer is not part of it: export
        keeps its tables). Phi must be gone (rank decay) first."""
        if self.aux is not None:
            raise ValueError("to_module(): the aux branch Phi is still present; finish rank decay first.")
        module = copy.deepcopy(self.base_layer)
        weight = self.quantized_weight().detach()
        if self.input_rotation is not None:  # W_q H^T: H is orthogonal
            weight = (weight.float() @ self.input_rotation.matrix().T).to(weight.dtype)
        module.weight = nn.Parameter(weight.clone())
        return module.requires_grad_(True)

    def mean_weight_step(self) -> float:
        return self.weight_quantizer.mean_step()

    def extra_repr(self) -> str:
        rank = 0 if self.lora_A is None else self.lora_A.shape[0]
        rotated = ", input rotated" if self.input_rotation is not None else ""
        low_rank = ", low-rank backward" if self.low_rank_backward else ""
        return f"w{self.weight_bits}a{self.act_bits}, lora_rank={rank}, packed={self.packed}{rotated}{low_rank}"


class QuantLinear(QuantLayer):
    base_type = nn.Linear
    channel_dim = -1

    def _apply_weight(self, x, weight, bias):  # type: ignore[override]
        return F.linear(x, weight, bias)

    def _apply_aux(self, x: torch.Tensor) -> torch.Tensor:
        return self.aux.forward_linear(x)

    def grad_ops(self) -> GradOps:
        return LinearGradOps()


class _QuantConv(QuantLayer):
    channel_dim = 1

    def _apply_weight(self, x, weight, bias):  # type: ignore[override]
        return self.base_layer._conv_forward(x, weight, bias)


class QuantConv2d(_QuantConv):
    base_type = nn.Conv2d

    def grad_ops(self) -> Optional[GradOps]:
        conv = self.base_layer
        plain = conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        return Conv2dGradOps(conv) if plain else None


class QuantConv3d(_QuantConv):
    base_type = nn.Conv3d


QUANT_LAYERS = {nn.Linear: QuantLinear, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d}
