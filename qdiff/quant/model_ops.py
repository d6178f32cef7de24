"""Model-wide operations on quantized layers: calibration, timestep tables, parameter groups.

The calibration and distillation loops work on whole models; these helpers spare them
from knowing which quantizer keeps which parameter.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import torch
from torch import nn

from .act_quantizer import ActQuantizer
from .layers import QuantLayer


def iter_quant_layers(model: nn.Module) -> Iterator[Tuple[str, QuantLayer]]:
    """(qualified name, layer) for every quantized layer of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            yield name, module


def start_calibration(model: nn.Module) -> None:
    """Activation quantizers pass inputs through and record per-timestep samples."""
    for module in model.modules():
        if isinstance(module, ActQuantizer):
            module.start_calibration()


def finish_calibration(model: nn.Module) -> List[str]:
    """Initialise every activation step size (or clipping ratio) from what was recorded.

    Layers the calibration runs never reached (e.g. an image embedder without image
    input) stop calibrating unchanged; their names are returned (and warned about).
    """
    unobserved = []
    for name, module in model.named_modules():
        if not isinstance(module, ActQuantizer):
            continue
        if module.has_observations:
            module.finish_calibration()
        else:
            module.stop_calibration()
            unobserved.append(name)
    if unobserved:
        warnings.warn(f"Calibration never reached {len(unobserved)} activation quantizers "
                      f"(left uncalibrated): {unobserved[:5]}{'...' if len(unobserved) > 5 else ''}")
    return unobserved


@contextlib.contextmanager
def calibrating(model: nn.Module) -> Iterator[None]:
    """`with calibrating(student): run trajectories` -- scales are set when the block exits."""
    start_calibration(model)
    yield
    finish_calibration(model)


def set_timesteps(model: nn.Module, timesteps: Union[Sequence[float], torch.Tensor]) -> None:
    """Declare the timestep table of every activation quantizer that keeps one (e.g.
    scheduler.timesteps)."""
    for module in model.modules():
        if isinstance(module, ActQuantizer):
            module.set_timesteps(timesteps)


def nonpositive_step_tables(model: nn.Module) -> List[str]:
    """Names of the activation quantizers with a step size (`step_sizes`) at or below zero.

    Training can push a step size through zero (or onto it, a division by zero). Past it the
    grid is mirrored about the zero point: unless that sits mid-range, most of the layer's
    input is clipped from then on -- silently, unless someone looks.
    """
    return [name for name, steps in _step_tables(model).items() if bool((steps.detach() <= 0).any())]


def _step_tables(model: nn.Module) -> Dict[str, nn.Parameter]:
    """Name -> step-size table (`ActQuantizer.step_sizes`) of every activation quantizer with one."""
    tables = {}
    for name, module in model.named_modules():
        steps = module.step_sizes() if isinstance(module, ActQuantizer) else None
        if steps is not None:
            tables[name] = steps
    return tables


def merge_lora(model: nn.Module) -> None:
    """Fold every layer's B @ A into its base weight (quantized outputs unchanged)."""
    for _, layer in iter_quant_layers(model):
        layer.merge()


@dataclass
class QuantParams:
    """Trainable parameters of the quantized layers, by role (for optimizer groups)."""

    lora: List[nn.Parameter] = field(default_factory=list)
    weight_scales: List[nn.Parameter] = field(default_factory=list)  # step sizes (+ LSQ+ zero points)
    act_scales: List[nn.Parameter] = field(default_factory=list)  # per-timestep steps / clip ratios
    aux: List[nn.Parameter] = field(default_factory=list)  # Phi factors (removed by rank decay)
    base_weights: List[nn.Parameter] = field(default_factory=list)  # float W0 (full QAT trains them)


def quant_parameters(model: nn.Module) -> QuantParams:
    """Collect the parameters of every quantized layer of `model` by role."""
    params = QuantParams()
    for _, layer in iter_quant_layers(model):
        if layer.lora_A is not None:
            params.lora += [layer.lora_A, layer.lora_B]
        params.weight_scales += list(layer.weight_quantizer.parameters())
        params.act_scales += list(layer.act_quantizer.parameters())
        if layer.aux is not None:
            params.aux += list(layer.aux.parameters())
        if not layer.packed:
            params.base_weights.append(layer.base_layer.weight)
    return params


def mean_weight_steps(model: nn.Module) -> Dict[str, float]:
    """Mean weight step size per quantized layer (what the scale-aware LoRA lr follows)."""
    return {name: layer.mean_weight_step() for name, layer in iter_quant_layers(model)}


def lora_param_groups(model: nn.Module, lr: float, scale_aware: bool = True) -> List[dict]:
    """One optimizer group per layer's LoRA; with `scale_aware`, lr ∝ the layer's mean step.

    Why per layer: with Adam, scaling a gradient changes nothing, scaling the learning
    rate does (EfficientDM). The rates are normalised so their mean over layers is `lr`.
    """
    layers = [(name, layer) for name, layer in iter_quant_layers(model) if layer.lora_A is not None]
    rates = _rates_by_step({name: layer.mean_weight_step() for name, layer in layers}, lr)
    return [{"params": [layer.lora_A, layer.lora_B], "name": f"lora:{name}",
             "lr": rates[name] if scale_aware else lr} for name, layer in layers]


def _rates_by_step(steps: Dict[str, float], lr: float) -> Dict[str, float]:
    """lr in proportion to each step size, normalised so the mean rate is `lr` (all `lr` if
    the steps are all zero)."""
    mean_step = sum(steps.values()) / max(len(steps), 1)
    return {name: lr * step / mean_step if mean_step > 0 else lr for name, step in steps.items()}


def act_param_groups(model: nn.Module, lr: float, scale_aware: bool = False) -> List[dict]:
    """The activation quantizers' parameters; with `scale_aware`, lr ∝ each step table's mean.

    Why: Adam moves every parameter by up to about lr per step whatever its size, and the
    temporal step sizes span 0.003 (an 8-bit time embedding) to 0.2 (a 4-bit conv input).
    A rate that suits the wide tables moves the narrow ones by 10% a step and can push
    them through zero, where the grid is mirrored (`nonpositive_step_tables`). So each table
    gets its own group, the rates normalised so their mean over tables is `lr`; zero
    points and dynamic clipping ratios (no size to follow) keep `lr`.
    """
    params = quant_parameters(model).act_scales
    if not scale_aware:
        return [{"params": params, "lr": lr, "name": "act_scales"}]
    trainable = {id(param) for param in params}
    tables = {name: scale for name, scale in _step_tables(model).items()
              if id(scale) in trainable and scale.numel()}
    steps = {name: float(scale.detach().abs().mean()) for name, scale in tables.items()}
    rates = _rates_by_step(steps, lr)
    in_tables = {id(scale) for scale in tables.values()}
    groups = [{"params": [scale], "name": f"act_scale:{name}", "lr": rates[name]}
              for name, scale in tables.items()]
    return groups + [{"params": [p for p in params if id(p) not in in_tables], "lr": lr,
                      "name": "act_scales"}]
