"""Student layer -> integer layer: merge QALoRA, refuse Phi, take the codes on the learned grid.

The codes are read off the student's own fake-quantized weight `Q_w(W0 + B @ A)` (what
its forward multiplies with), so the exported layer applies exactly the student's
weight; the activation tables are copied as they are. Nothing on the student changes:
LoRA is folded into a temporary weight, not into the student, so a training run can
export a checkpoint and go on training.
"""

from __future__ import annotations

from typing import Iterable, Union

import torch

from qdiff.quant import (DynamicActQuantizer, QuantLayer, SplitActQuantizer, TemporalActQuantizer,
                         TimestepContext)

from .act_codes import ActCodesModule, TimestepActCodes, TokenActCodes
from .format import LayerSpec
from .int_layers import INT_LAYERS, IntLayer
from .split_layer import SplitIntLayer

ExportLayer = Union[IntLayer, SplitIntLayer]


def check_no_aux(layers: Iterable[tuple[str, QuantLayer]]) -> None:
    """ValueError naming every layer that still carries the QVGen auxiliary branch Phi."""
    left = [f"{name} (rank {layer.aux.rank})" for name, layer in layers if layer.aux is not None]
    if left:
        raise ValueError(
            f"Cannot export: the auxiliary branch Phi is still present in {len(left)} layer(s): "
            f"{', '.join(left[:5])}{', ...' if len(left) > 5 else ''}. Phi is a training aid that "
            f"inference must not carry; run the rank-decay schedule (qdiff.quant.RankDecay) to "
            f"its end, which deletes it, before exporting.")


def _act_table(name: str, quantizer: torch.nn.Module) -> tuple[str, int, int]:
    """(granularity, table size, channel group size) of one activation quantizer, checked
    to be exportable."""
    if isinstance(quantizer, TemporalActQuantizer):
        if quantizer.calibrating or quantizer.timesteps.numel() == 0:
            raise ValueError(f"Cannot export layer '{name}': its activation step sizes are not "
                             f"calibrated (run qdiff.calibrate.calibrate, or finish calibration).")
        return TimestepActCodes.granularity, quantizer.timesteps.numel(), 0
    if isinstance(quantizer, DynamicActQuantizer):
        return TokenActCodes.granularity, quantizer.clip_ratio.numel(), quantizer.group_size
    raise TypeError(f"Layer '{name}': unknown activation quantizer {type(quantizer).__name__}.")


def layer_spec(name: str, layer: QuantLayer) -> LayerSpec:
    tables = {_act_table(name, quantizer) for quantizer in _act_quantizers(layer)}
    if len(tables) > 1:  # one spec describes every slice's table
        raise ValueError(f"Cannot export layer '{name}': its input slices have activation tables "
                         f"of different kinds, sizes or channel groups {sorted(tables)}; "
                         f"calibrate them together.")
    (granularity, table_size, group_size), = tables
    quantizer = layer.act_quantizer
    act_split = quantizer.widths if isinstance(quantizer, SplitActQuantizer) else ()
    return LayerSpec(type=layer.base_type.__name__, weight_bits=layer.weight_bits,
                     weight_symmetric=layer.weight_quantizer.symmetric, act_bits=layer.act_bits,
                     act_symmetric=quantizer.symmetric, act_granularity=granularity,
                     act_table_size=table_size, weight_shape=tuple(layer.weight_shape),
                     act_split=act_split,
                     input_rotation="none" if layer.input_rotation is None else "hadamard",
                     act_group_size=group_size)


def empty_int_layer(module: torch.nn.Module, spec: LayerSpec, context: TimestepContext) -> ExportLayer:
    """The (not yet loaded) integer layer that replaces the float `module` as `spec` says."""
    if spec.act_split:
        acts = [act_codes_module(spec.part(width), context) for width in spec.act_split]
        return SplitIntLayer.like(module, spec, acts)
    return INT_LAYERS[spec.type].like(module, spec, act_codes_module(spec, context))


def act_codes_module(spec: LayerSpec, context: TimestepContext) -> ActCodesModule:
    """An empty (not yet loaded) activation module for a layer of `spec`."""
    if spec.act_granularity == TimestepActCodes.granularity:
        return TimestepActCodes(spec.act_bits, spec.act_symmetric, spec.act_table_size, context)
    channel_dim = -1 if spec.type == "Linear" else 1
    return TokenActCodes(spec.act_bits, spec.act_symmetric, spec.act_table_size, channel_dim, context,
                         spec.act_group_size)


@torch.no_grad()
def _copy_act_tables(source: torch.nn.Module, target: ActCodesModule) -> None:
    if isinstance(target, TimestepActCodes):
        target.timesteps.copy_(source.timesteps)
        target.scale.copy_(source.scale.detach().clamp_min(1e-8))  # as the student's forward
        target.zero_point.copy_(source.zero_point.detach().round())
    else:
        target.clip_ratio.copy_(source.clip_ratio.detach().clamp_min(1e-4))
        target.group_edges.copy_(source.group_edges)


@torch.no_grad()
def weight_codes(name: str, layer: QuantLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero_point) of Q_w(W0 + B @ A) on the layer's learned grid, in float32."""
    weight = layer.base_weight().float()
    if layer.lora_A is not None and not layer.merged:
        weight = weight + layer.get_delta_weight().float()
    quantizer = layer.weight_quantizer
    fake = quantizer(weight)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    scale = quantizer.scale.detach().float().clamp_min(1e-8).view(shape)
    zero_point = quantizer.zero_point.detach().float().round().view(shape)
    codes = torch.round(fake / scale) + zero_point
    error = ((codes - zero_point) * scale - fake).abs().max()
    if not torch.isfinite(error) or error > 1e-5 * fake.abs().max().clamp_min(1e-30):
        raise ValueError(f"Cannot export layer '{name}': its weight does not lie on its grid "
                         f"(error {float(error):.3g}); are its scales finite and positive?")
    return codes, scale.reshape(-1), zero_point.reshape(-1)


def _act_modules(layer: ExportLayer) -> list[ActCodesModule]:
    return [part.act for part in layer.parts] if isinstance(layer, SplitIntLayer) else [layer.act]


def _act_quantizers(layer: QuantLayer) -> list[torch.nn.Module]:
    quantizer = layer.act_quantizer
    return list(quantizer.parts) if isinstance(quantizer, SplitActQuantizer) else [quantizer]


def freeze_layer(name: str, layer: QuantLayer, context: TimestepContext) -> ExportLayer:
    """The integer layer that computes what `layer` (Phi-free) computes."""
    check_no_aux([(name, layer)])
    spec = layer_spec(name, layer)
    int_layer = empty_int_layer(layer.base_layer, spec, context).to(layer.weight_quantizer.scale.device)
    for source, target in zip(_act_quantizers(layer), _act_modules(int_layer)):
        _copy_act_tables(source, target)
    int_layer.set_weight(*weight_codes(name, layer))
    return int_layer
