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
import math
from typing import Any, Callable, Mapping

import torch
from torch import nn

from qdiff.errors import QdiffError
from qdiff.quant import QuantLayer, iter_quant_layers, timestep_context


@torch.no_grad()
def on_grid_reference(student: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A `dtype` copy of `student` whose base weights are its float32 Q_w(W0 + B @ A).

    Re-quantizing those weights in `dtype` gives back the same codes, so the copy's
    forward is the student's function on the student's grid, evaluated in `dtype`.

    Args:
        student: A quantized student.
        dtype: The copy's dtype.

    Returns:
        The copy; the student is unchanged.

    Raises:
        ValueError: The student's base weights are packed (`packed_base_weight=True`).
    """
    reference = copy.deepcopy(student)
    for _, layer in iter_quant_layers(reference):
        if layer.packed:
            raise ValueError("on_grid_reference() needs a float base weight (packed_base_weight=False).")
        weight = layer.quantized_weight().float()
        layer.base_layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.lora_A = layer.lora_B = None
    return reference.to(dtype)


def _worse(a: float, b: float) -> float:
    """The larger of two errors, NaN (a broken output) above any number: Python's max()
    keeps its first argument when the other is NaN, so max(0.0, nan) would read 0."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


@torch.no_grad()
def layer_mismatch(student: nn.Module, model: nn.Module,
                   run_student: Callable[[nn.Module], Any]) -> dict[str, float]:
    """Per layer: max |integer(x) - student(x)| / max |student(x)| on the student's inputs.

    `run_student(student)` runs the student (one or more forwards); each quantized layer's
    input is handed, at the same timestep, to the integer layer of the same name.

    Args:
        student: The quantized student.
        model: Its exported integer model.
        run_student: Runs the student on the inputs to compare on.

    Returns:
        `{layer name: relative error}`.
    """
    errors: dict[str, float] = {}
    context = timestep_context(model)

    def compare(name: str) -> Callable:
        int_layer = model.get_submodule(name)

        def hook(layer: QuantLayer, args: tuple, output: torch.Tensor) -> None:
            with context.use(layer.context.timesteps):
                exported = int_layer(args[0])
            error = float((exported - output).abs().max() / output.abs().max().clamp_min(1e-30))
            errors[name] = _worse(errors.get(name, 0.0), error)
        return hook

    handles = [layer.register_forward_hook(compare(name)) for name, layer in iter_quant_layers(student)]
    try:
        run_student(student)
    finally:
        for handle in handles:
            handle.remove()
    return errors


# Float rounding leaves a layer 1e-7..4e-6 off its student (tests/test_export_*); a wrong
# scale, a stale table or a mis-packed code is off by a quantization step, 1e-2 and more.
EXPORT_TOLERANCE = 1e-4


class ExportMismatchError(QdiffError, RuntimeError):
    """An exported integer layer does not compute what its student layer computes."""


@torch.no_grad()
def check_export(family: Any, students: Mapping[str, nn.Module], models: Mapping[str, nn.Module],
                 guidance: float, steps: int = 3,
                 tolerance: float = EXPORT_TOLERANCE) -> dict[str, float]:
    """`layer_mismatch` of each exported model (`models`, by component) on its student's
    inputs along a `steps`-step call of the family's pipeline with the students answering,
    for two of the family's preview conditions; raises ExportMismatchError naming the worst
    layers when one is off by more than `tolerance` (relative), else returns the per-layer
    errors (named `component.layer` when there are several denoisers).

    `family` is the teacher's (`qdiff.families`): its pipeline, conditions and scheduler are
    the ones the students were trained with.

    Args:
        family: The teacher's family.
        students: `{component: student}`.
        models: `{component: exported model}`.
        guidance: The guidance scale of the call.
        steps: The number of steps of the call.
        tolerance: The largest relative error allowed.

    Returns:
        `{layer name: relative error}`.

    Raises:
        ExportMismatchError: A layer's error is above `tolerance`.
    """
    from qdiff.walk import sample_with_students  # late: qdiff.walk imports qdiff.quant

    ids = family.preview_conditions()[:2]
    kwargs = family.call_kwargs(ids, [torch.Generator().manual_seed(j) for j in range(len(ids))],
                                steps, guidance)
    errors: dict[str, float] = {}
    for component, model in models.items():
        prefix = f"{component}." if len(models) > 1 else ""
        found = layer_mismatch(students[component], model,
                               lambda _: sample_with_students(family.pipe, students, kwargs))
        errors.update({prefix + name: error for name, error in found.items()})
    # `not error <= tolerance` also catches NaN, which compares false with everything
    failing = [item for item in errors.items() if not item[1] <= tolerance]
    if failing:
        worst = sorted(failing, key=lambda item: math.inf if math.isnan(item[1]) else item[1],
                       reverse=True)[:3]
        listed = ", ".join(f"{name} ({error:.2g})" for name, error in worst)
        raise ExportMismatchError(
            f"the exported integer layers do not reproduce the student: worst relative error "
            f"{listed}, allowed {tolerance:g}. This is a bug in qdiff's export: please report "
            f"it with the run's config.yaml.")
    return errors
