"""Bytes of a distillation's resident tensors, counted on a model that holds none.

    model = build_meta(json.load(open("eval/memory/architectures/flux1-dev.json")))
    teacher = teacher_bytes(model)                          # bf16 teacher denoiser
    student = student_bytes(model, quant_cfg, lora_cfg)     # what quantize_ leaves, + optimizer

The model is built on the meta device (shapes, no storage). Which layers are quantized, and
at what bits, comes from qdiff's own rules (`qdiff.quant.quantize.select_layers` and
`layer_bits`: `include` / `exclude` / `_keep_in_fp32_modules` / `overrides`); the family's
8-bit layers go in as overrides first, by the family's own `quant_config`. What a quantized layer holds is what `qdiff.quant.layers.QuantLayer`
registers with `quant.packed_base_weight=true`:

- `base_codes`: the frozen W0's codes, flat uint8, `8 // container_bits(bits)` codes a byte;
- `base_scale`, `base_zero_point`: float32, one per output channel (frozen copies);
- the weight quantizer, built here for real from `quant.weight_mode` -- a `per_channel` one
  holds `scale` (parameter) and `zero_point` (buffer, or parameter with LSQ+), float32 per
  output channel;
- the activation quantizer(s): built here for real (they are a few floats) -- a
  `dynamic_per_token` one holds `act_timestep_groups` clipping ratios and the group edges, a
  `temporal` one a table of `table_entries` timesteps, step sizes and zero points; a split
  input one per part;
- the original layer's bias, and LoRA A (rank, fan_in) and B (out, rank), float32;
- with `aux.enabled`, Phi's L (out, r), R (r, fan_in), its mask and phase.

Everything else of the student is float32 (`build_student` deep-copies the teacher and
calls `.float()`, which casts floating parameters and buffers; integer and complex ones
keep their dtype). The optimizer (`qdiff.distill.optim`) is AdamW over LoRA, the activation
step sizes, Phi and (with `distill.weight_scale_lr` > 0) the weight step sizes: each holds
a gradient and two moments of its own size and a float32 `step` scalar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from qdiff.config import AuxConfig, LoRAConfig, QuantConfig
from qdiff.quant import TimestepContext, act_quantizer_class, weight_quantizer_class
from qdiff.quant.concat_inputs import concat_input_splits
from qdiff.quant.packing import container_bits
from qdiff.quant.quantize import layer_bits, select_layers

GB = 1e9  # decimal gigabytes, as GPU memory is sold ("80 GB")
ADAM_STEP_BYTES = 4  # torch.optim.AdamW keeps `step` as a float32 scalar per parameter
FLOAT32 = 4


def build_meta(config: Mapping[str, Any]) -> nn.Module:
    """The diffusers model of `config` (its `_class_name`) on the meta device: no storage."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        return cls.from_config(dict(config))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def _bytes(tensor: torch.Tensor, float_dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of `tensor`, its floating dtype replaced by `float_dtype` if given."""
    if float_dtype is not None and tensor.is_floating_point():
        return tensor.numel() * torch.finfo(float_dtype).bits // 8
    return tensor.numel() * tensor.element_size()


def teacher_bytes(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """The teacher denoiser cast to `dtype` (`Family.cast_teacher`: `.to(dtype)` on the
    whole denoiser, `_keep_in_fp32_modules` included), parameters and buffers."""
    return sum(_bytes(t, dtype) for _, t in _tensors(model))


@dataclass
class StudentBytes:
    """A student's resident bytes by role (all exact, in bytes)."""

    quantized_layers: int = 0  # layers quantized
    float_layers: int = 0  # Linear / Conv layers left in float
    codes: int = 0  # packed base weights (uint8)
    quantizer_tables: int = 0  # base scales / zero points, weight and activation quantizers
    biases: int = 0  # quantized layers' biases (float32)
    other_float: int = 0  # everything else of the student: float layers, norms, embeddings, buffers
    lora: int = 0  # LoRA A and B (float32)
    aux: int = 0  # QVGen Phi (float32), at its initial rank
    trainable: int = 0  # bytes of the parameters AdamW updates (LoRA, Phi, step sizes)
    trainable_tensors: int = 0  # how many (AdamW keeps a `step` scalar for each)

    @property
    def model(self) -> int:
        """Parameters and buffers of the quantized student (LoRA and Phi included)."""
        return self.codes + self.quantizer_tables + self.biases + self.other_float + self.lora + self.aux

    @property
    def frozen_part(self) -> int:
        """The student without its adapters (LoRA, Phi)."""
        return self.model - self.lora - self.aux

    @property
    def optimizer(self) -> int:
        """Gradients and AdamW's two moments of every trained tensor, and its `step` scalars."""
        return 3 * self.trainable + ADAM_STEP_BYTES * self.trainable_tensors

    @property
    def adapters_with_adamw(self) -> int:
        """LoRA and Phi, plus the gradients and AdamW state of everything trained (the step
        sizes' share of it is a few MB)."""
        return self.lora + self.aux + self.optimizer

    @property
    def total(self) -> int:
        return self.model + self.optimizer


def _module_bytes(module: nn.Module, trainable: bool) -> tuple[int, int, int]:
    """(bytes, bytes of parameters, number of parameters) of a small module built for real."""
    total = sum(_bytes(t) for _, t in _tensors(module))
    params = [p for p in module.parameters()] if trainable else []
    return total, sum(_bytes(p) for p in params), len(params)


def _act_quantizer_bytes(cfg: QuantConfig, bits: int, table_entries: int, width: int,
                         channel_dim: int) -> tuple[int, int, int]:
    """An activation quantizer of `cfg.act_mode`, built on the CPU (a few floats) and sized
    as a run sizes it (`set_timesteps` with `table_entries` values where it keeps a table)."""
    cls = act_quantizer_class(cfg.act_mode)
    group_size = cfg.act_group_size if (cls.channel_groups and cfg.act_group_size
                                        and width > cfg.act_group_size) else 0
    with torch.device("cpu"):
        quantizer = cls.from_config(cfg, bits=bits, context=TimestepContext(),
                                    channel_dim=channel_dim, group_size=group_size)
        if hasattr(quantizer, "set_timesteps"):
            quantizer.set_timesteps(torch.arange(table_entries, dtype=torch.float32))
    return _module_bytes(quantizer, trainable=True)


def student_bytes(model: nn.Module, quant_cfg: QuantConfig, lora_cfg: Optional[LoRAConfig] = None,
                  aux_cfg: Optional[AuxConfig] = None, *, table_entries: int = 50,
                  train_weight_scales: bool = True) -> StudentBytes:
    """The bytes `build_student` + `quantize_(model, quant_cfg, lora_cfg, aux_cfg)` leave
    resident for `model` (a meta model is enough), with `packed_base_weight` as `quant_cfg`
    says, plus what AdamW adds after a step.

    `quant_cfg` is the config `quantize_` gets (family 8-bit layers already among its
    overrides: `FAMILIES[name].quant_config(cfg)`). `table_entries`: the timesteps of a `temporal`
    activation table (the trajectory's steps). `train_weight_scales`: whether the weight
    step sizes train (`distill.weight_scale_lr` > 0, the default)."""
    if quant_cfg.rotate_inputs:
        raise NotImplementedError("quant.rotate_inputs: the Hadamard rotation's bytes are not counted.")
    out = StudentBytes()
    splits = concat_input_splits(model) if quant_cfg.split_concat_inputs else {}
    selected = select_layers(model, quant_cfg)
    quantized = {name: module for name, module, reason in selected if not reason}
    out.quantized_layers, out.float_layers = len(quantized), len(selected) - len(quantized)
    dropped = set()  # the float weights packing replaces
    act_cache: dict[tuple[int, int, int], tuple[int, int, int]] = {}
    for name, module in quantized.items():
        weight = module.weight
        dropped.add(id(weight))
        out_channels, fan_in = weight.shape[0], weight[0].numel()
        weight_bits, act_bits = layer_bits(name, quant_cfg)
        if quant_cfg.packed_base_weight:
            out.codes += math.ceil(weight.numel() / (8 // container_bits(weight_bits)))
            out.quantizer_tables += 2 * out_channels * FLOAT32  # base_scale, base_zero_point
        else:
            out.other_float += weight.numel() * FLOAT32
        with torch.device("cpu"):
            weight_quantizer = weight_quantizer_class(quant_cfg.weight_mode).from_config(
                quant_cfg, out_channels=out_channels, bits=weight_bits)
        total, trained, count = _module_bytes(weight_quantizer, train_weight_scales)
        out.quantizer_tables += total
        out.trainable += trained
        out.trainable_tensors += count
        channel_dim = -1 if isinstance(module, nn.Linear) else 1
        for width in splits.get(name, (weight.shape[1],)):
            key = (act_bits, width, channel_dim)
            if key not in act_cache:
                act_cache[key] = _act_quantizer_bytes(quant_cfg, act_bits, table_entries, width,
                                                      channel_dim)
            total, trained, count = act_cache[key]
            out.quantizer_tables += total
            out.trainable += trained
            out.trainable_tensors += count
        if module.bias is not None:
            out.biases += module.bias.numel() * FLOAT32
            dropped.add(id(module.bias))
        if lora_cfg is not None and lora_cfg.enabled:
            rank = min(lora_cfg.rank, out_channels, fan_in)
            lora = (rank * fan_in + out_channels * rank) * FLOAT32
            out.lora += lora
            out.trainable += lora
            out.trainable_tensors += 2
        if aux_cfg is not None and aux_cfg.enabled:
            rank = min(aux_cfg.rank, out_channels, fan_in)
            factors = (out_channels * rank + rank * fan_in) * FLOAT32
            out.aux += factors + rank * FLOAT32 + 8  # + mask (float32), phase (int64 scalar)
            out.trainable += factors
            out.trainable_tensors += 2
    seen = set()
    for _, tensor in _tensors(model):
        if id(tensor) in seen or id(tensor) in dropped:
            continue
        seen.add(id(tensor))
        out.other_float += _bytes(tensor, torch.float32)
    return out


def encoder_bytes(parameters: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a frozen component of `parameters` parameters in `dtype`."""
    return parameters * torch.finfo(dtype).bits // 8
