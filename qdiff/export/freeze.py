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

from qdiff.quant import ActTable, QuantLayer, TimestepContext

from .act_codes import ACT_CODES, ActCodesModule
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


def _act_tables(name: str, layer: QuantLayer) -> list[ActTable]:
    """The frozen table of each activation quantizer of `layer` (one per input slice),
    checked to be of one kind, size and channel grouping, and exportable."""
    tables = [quantizer.export_table(name) for quantizer in layer.act_quantizers()]
    kinds = {table[:3] for table in tables}
    if len(kinds) > 1:  # one spec describes every slice's table
        raise ValueError(f"Cannot export layer '{name}': its input slices have activation tables "
                         f"of different kinds, sizes or channel groups {sorted(kinds)}; "
                         f"calibrate them together.")
    if tables[0].granularity not in ACT_CODES:
        raise ValueError(f"Cannot export layer '{name}': no activation codes module computes its "
                         f"act_granularity {tables[0].granularity!r}; registered: {list(ACT_CODES)} "
                         f"(qdiff.export.act_codes.register_act_codes).")
    return tables


def layer_spec(name: str, layer: QuantLayer) -> LayerSpec:
    return _layer_spec(layer, _act_tables(name, layer)[0])


def _layer_spec(layer: QuantLayer, table: ActTable) -> LayerSpec:
    granularity, table_size, group_size, _ = table
    quantizer = layer.act_quantizer
    return LayerSpec(type=layer.base_type.__name__, weight_bits=layer.weight_bits,
                     weight_symmetric=layer.weight_quantizer.symmetric, act_bits=layer.act_bits,
                     act_symmetric=quantizer.symmetric, act_granularity=granularity,
                     act_table_size=table_size, weight_shape=tuple(layer.weight_shape),
                     act_split=layer.act_split,
                     input_rotation="none" if layer.input_rotation is None else "hadamard",
                     act_group_size=group_size)


def empty_int_layer(module: torch.nn.Module, spec: LayerSpec, context: TimestepContext) -> ExportLayer:
    """The (not yet loaded) integer layer that replaces the float `module` as `spec` says."""
    if spec.act_split:
        acts = [act_codes_module(spec.part(width), context) for width in spec.act_split]
        return SplitIntLayer.like(module, spec, acts)
    return INT_LAYERS[spec.type].like(module, spec, act_codes_module(spec, context))


def act_codes_module(spec: LayerSpec, context: TimestepContext) -> ActCodesModule:
    """An empty (not yet loaded) activation module for a layer of `spec`: the one
    registered under its `act_granularity`."""
    channel_dim = -1 if spec.type == "Linear" else 1
    return ACT_CODES[spec.act_granularity].from_spec(spec, context, channel_dim)


@torch.no_grad()
def weight_codes(name: str, layer: QuantLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero_point) of Q_w(W0 + B @ A) on the layer's learned grid, in float32."""
    weight = layer.base_weight().float()
    if layer.lora_A is not None and not layer.merged:
        weight = weight + layer.get_delta_weight().float()
    quantizer = layer.weight_quantizer
    fake = quantizer(weight)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    scale, zero_point = (param.view(shape) for param in quantizer.export_params())
    codes = torch.round(fake / scale) + zero_point
    error = ((codes - zero_point) * scale - fake).abs().max()
    if not torch.isfinite(error) or error > 1e-5 * fake.abs().max().clamp_min(1e-30):
        raise ValueError(f"Cannot export layer '{name}': its weight does not lie on its grid "
                         f"(error {float(error):.3g}); are its scales finite and positive?")
    return codes, scale.reshape(-1), zero_point.reshape(-1)


def _act_modules(layer: ExportLayer) -> list[ActCodesModule]:
    return [part.act for part in layer.parts] if isinstance(layer, SplitIntLayer) else [layer.act]


def freeze_layer(name: str, layer: QuantLayer, context: TimestepContext) -> ExportLayer:
    """The integer layer that computes what `layer` (Phi-free) computes."""
    check_no_aux([(name, layer)])
    tables = _act_tables(name, layer)
    spec = _layer_spec(layer, tables[0])
    int_layer = empty_int_layer(layer.base_layer, spec, context).to(layer.weight_quantizer.device)
    for table, target in zip(tables, _act_modules(int_layer)):
        target.load_table(table.tensors)
    int_layer.set_weight(*weight_codes(name, layer))
    return int_layer
