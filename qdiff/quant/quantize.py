"""`quantize_`: swap a denoiser's Linear / Conv layers for quantized ones, in place."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Optional, Tuple

from torch import nn

from qdiff.config import AuxConfig, LoRAConfig, QuantConfig

from .concat_inputs import concat_input_splits
from .layers import QUANT_LAYERS, QuantLayer
from .report import QuantizationReport, ReportRow
from .rotation import HadamardRotation
from .timestep_context import TimestepContext

CONTEXT_ATTR = "_qdiff_timestep_context"


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _keep_float_reason(name: str, cfg: QuantConfig, keep_fp32: Iterable[str]) -> str:
    """Why `name` stays float ('' if it is quantized)."""
    if not _matches(name, cfg.include):
        return "not included"
    if _matches(name, cfg.exclude):
        return "excluded"
    # diffusers' rule: an entry matches a whole component of the qualified name
    if any(part in keep_fp32 for part in name.split(".")):
        return "_keep_in_fp32_modules"
    return ""


def _bits_for(name: str, cfg: QuantConfig) -> Tuple[int, int, str]:
    """(weight_bits, act_bits, note) from the first matching override, else the defaults."""
    for override in cfg.overrides:
        if fnmatch.fnmatchcase(name, override.pattern):
            weight_bits = override.weight_bits if override.weight_bits is not None else cfg.weight_bits
            act_bits = override.act_bits if override.act_bits is not None else cfg.act_bits
            return weight_bits, act_bits, f"override '{override.pattern}'"
    return cfg.weight_bits, cfg.act_bits, ""


def timestep_context(model: nn.Module) -> TimestepContext:
    """The context shared by `model`'s quantizers (created and hooked on first use)."""
    context = getattr(model, CONTEXT_ATTR, None)
    if context is None:
        context = TimestepContext()
        setattr(model, CONTEXT_ATTR, context)
    context.install(model)
    return context


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear / Conv layers of `model` that are not already part of a quantized layer."""
    wrapped = [name for name, m in model.named_modules() if isinstance(m, QuantLayer)]
    return [(name, module) for name, module in model.named_modules()
            if name and type(module) in QUANT_LAYERS
            and not any(name.startswith(prefix + ".") for prefix in wrapped)]


def select_layers(model: nn.Module, quant_cfg: QuantConfig) -> list[tuple[str, nn.Module, str]]:
    """`quantize_`'s choice, without changing `model`: (name, layer, why it stays float) for
    every Linear / Conv layer, the reason '' for those it quantizes (their bits: `layer_bits`).
    Works on a model on the meta device (eval/memory counts real sizes so)."""
    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return [(name, module, _keep_float_reason(name, quant_cfg, keep_fp32))
            for name, module in _candidates(model)]


def layer_bits(name: str, quant_cfg: QuantConfig) -> Tuple[int, int]:
    """(weight_bits, act_bits) `quantize_` gives the layer `name`: the first matching
    `quant_cfg.overrides` entry, else the defaults."""
    weight_bits, act_bits, _ = _bits_for(name, quant_cfg)
    return weight_bits, act_bits


def _input_splits(model: nn.Module, cfg: QuantConfig) -> dict[str, tuple[int, int]]:
    if not cfg.split_concat_inputs:
        return {}
    splits = concat_input_splits(model)
    if not splits:
        raise ValueError(f"quant.split_concat_inputs is true, but this {type(model).__name__} "
                         f"feeds no layer a concatenated input (UNet up blocks do); set "
                         f"quant.split_concat_inputs=false for it.")
    return splits


def quantize_(model: nn.Module, quant_cfg: QuantConfig, lora_cfg: Optional[LoRAConfig] = None,
              aux_cfg: Optional[AuxConfig] = None) -> QuantizationReport:
    """Replace every selected `nn.Linear` / `nn.Conv2d` / `nn.Conv3d` of `model` in place.

    Layers are selected by `quant_cfg.include` / `exclude` (fnmatch on qualified names);
    diffusers' `_keep_in_fp32_modules` also stay float. `quant_cfg.overrides` set bits per
    pattern, first match wins. A forward pre-hook on `model` feeds its `timestep` argument
    to every activation quantizer. Weight scales (and Phi) are initialised here from the
    weights; activation scales need calibration (see `model_ops.calibrating`). With
    `quant_cfg.split_concat_inputs`, layers whose input is a concatenation quantize each
    part with its own step sizes (`concat_inputs`). Linear layers matched by
    `quant_cfg.rotate_inputs` rotate their input by a Hadamard matrix (`rotation`).
    """
    context = timestep_context(model)
    splits = _input_splits(model, quant_cfg)
    candidates = select_layers(model, quant_cfg)
    _check_rotations([(name, module) for name, module, reason in candidates if not reason], quant_cfg)
    rows = []
    for name, module, reason in candidates:
        params = sum(p.numel() for p in module.parameters())
        kind = type(module).__name__
        if reason:
            rows.append(ReportRow(name, kind, None, None, params, reason))
            continue
        weight_bits, act_bits, note = _bits_for(name, quant_cfg)
        rotate = _matches(name, quant_cfg.rotate_inputs)
        layer = QUANT_LAYERS[type(module)].from_module(
            module, weight_bits, act_bits, quant_cfg, lora_cfg, aux_cfg, context, rotate)
        if rotate:
            note = ", ".join(filter(None, [note, "input rotated"]))
        if name in splits:
            layer.split_input(splits[name], quant_cfg)
            note = ", ".join(filter(None, [note, "input split " + "+".join(map(str, splits[name]))]))
        layer.train(module.training)
        model.set_submodule(name, layer)
        rows.append(ReportRow(name, kind, weight_bits, act_bits, params, note))
    return QuantizationReport(rows)


def _check_rotations(quantized: list[tuple[str, nn.Module]], cfg: QuantConfig) -> None:
    """Before any layer is swapped: every rotation pattern matches a quantized layer (else
    it is a typo), and only Linear ones."""
    names = [name for name, _ in quantized]
    unmatched = [p for p in cfg.rotate_inputs if not any(_matches(name, [p]) for name in names)]
    if unmatched:
        raise ValueError(f"quant.rotate_inputs {unmatched} match(es) no quantized layer; the "
                         f"quantized layers are named like {names[:3]}. Fix the pattern(s).")
    rotated = [(name, module) for name, module in quantized if _matches(name, cfg.rotate_inputs)]
    not_linear = [name for name, module in rotated if type(module) is not nn.Linear]
    if not_linear:
        raise ValueError(f"quant.rotate_inputs matches {not_linear[:3]}, which are not Linear "
                         f"layers; qdiff rotates the inputs of Linear layers only. Narrow the "
                         f"pattern(s) {cfg.rotate_inputs}.")
    for _, module in rotated:  # a width without a Hadamard matrix: refused with the fix
        HadamardRotation(module.in_features)
