"""Checks that an integer model computes what its student computes.

Why two checks. The integer layers sum exactly; the student's fake-quant layers sum in
float32, off by float rounding. A later activation quantizer can round such an
off-by-rounding value to the neighbouring code (it sat on a rounding boundary), so
whole float32 forwards of student and export can differ by a step here and there while
both are right to float precision. Hence:

- `layer_mismatch`: every integer layer is fed its student layer's own input (float32,
  as in training) and must give the student layer's output up to float rounding;
- `on_grid_reference`: the student's fake-quant forward in float64, on the student's own
  float32 weight grid: with rounding 2**29 times smaller, boundary cases practically
  vanish, and the float64 integer model must match the whole forward to float rounding.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from qdiff.quant import QuantLayer, iter_quant_layers, timestep_context


@torch.no_grad()
def on_grid_reference(student: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A `dtype` copy of `student` whose base weights are its float32 Q_w(W0 + B @ A).

    Re-quantizing those weights in `dtype` gives back the same codes, so the copy's
    forward is the student's function on the student's grid, evaluated in `dtype`.
    """
    reference = copy.deepcopy(student)
    for _, layer in iter_quant_layers(reference):
        if layer.packed:
            raise ValueError("on_grid_reference() needs a float base weight (packed_base_weight=False).")
        weight = layer.quantized_weight().float()
        layer.base_layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.lora_A = layer.lora_B = None
    return reference.to(dtype)


@torch.no_grad()
def layer_mismatch(student: nn.Module, model: nn.Module,
                   run_student: Callable[[nn.Module], Any]) -> dict[str, float]:
    """Per layer: max |integer(x) - student(x)| / max |student(x)| on the student's inputs.

    `run_student(student)` runs the student (one or more forwards); each quantized layer's
    input is handed, at the same timestep, to the integer layer of the same name.
    """
    errors: dict[str, float] = {}
    context = timestep_context(model)

    def compare(name: str) -> Callable:
        int_layer = model.get_submodule(name)

        def hook(layer: QuantLayer, args: tuple, output: torch.Tensor) -> None:
            with context.use(layer.context.timesteps):
                exported = int_layer(args[0])
            error = float((exported - output).abs().max() / output.abs().max().clamp_min(1e-30))
            errors[name] = max(errors.get(name, 0.0), error)
        return hook

    handles = [layer.register_forward_hook(compare(name)) for name, layer in iter_quant_layers(student)]
    try:
        run_student(student)
    finally:
        for handle in handles:
            handle.remove()
    return errors
