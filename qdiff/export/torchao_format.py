"""`export.format: torchao`: a student as a stock diffusers model with torchao int8 weights.

The portable export needs no qdiff to load: its denoiser is the plain diffusers class
(`UNet2DConditionModel`, `FluxTransformer2DModel`, ...), and `config.json` carries the
`quantization_config` of diffusers' own torchao quantizer (`TorchAoConfig`), so
`DiffusionPipeline.from_pretrained(path, dtype=...)` loads it wherever torchao
(>= 0.16) is installed. diffusers saves the torchao tensors as safetensors (torchao's
`flatten_tensor_state_dict`).

What each quantized layer of the student becomes:

* Linear: its weight is a torchao `Int8Tensor` built from qdiff's own grid, not
  re-quantized: the codes centred on their zero point (q - zp: 4-bit asymmetric codes
  lie in [-15, 15]) and the per-output-channel step sizes, so dequant(W) is the student's
  Q_w(W0 + B @ A) (to float rounding: torchao multiplies in its own order). Its input is
  quantized on the fly per token (per row) to int8, asymmetric or symmetric as the
  student's activations are (`act_quant_kwargs` of the tensor: torchao's
  `Int8DynamicActivationInt8WeightConfig` layout). For a student with 8-bit
  `dynamic_per_token` asymmetric activations and clip ratio 1, that is the student's own
  activation grid (to float rounding at code edges). Learned clip ratios < 1, symmetric
  activations (torchao divides by 127.5, qdiff by 127) and `temporal` (per-timestep)
  step-size tables have no torchao form: those inputs get torchao's dynamic per-token
  grid, and the layers are named in config.json under
  `_qdiff_torchao["dynamic_activations_replace"]`.
* Convolution (torchao has no int8 convolution), and a Linear whose centred codes do not
  fit int8 (8-bit asymmetric weights with an off-centre zero point): a float layer whose
  weight is the student's dequantized Q_w, float input. Named, with the reason, in
  `quantization_config["modules_to_not_convert"]` and `_qdiff_torchao["float_layers"]`.
* Refused (`TorchaoExportError`, one line naming the layers): what only qdiff's kernels
  compute -- activations below 8 bits, Hadamard-rotated inputs, split (concatenated)
  inputs, per-group activations within a token. Export those with `export.format: qdiff`.

`torchao_model(student)` builds it from a student, `torchao_model_from_export(model)` from
a loaded qdiff export's denoiser (its stored codes and scales), for `convert_export`.

diffusers drops config keys starting with "_" when it builds the model, so the
`_qdiff_torchao` record is for people and tools only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
from accelerate import init_empty_weights
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from qdiff.errors import QdiffError
from qdiff.quant import iter_quant_layers
from qdiff.quant.layers import QuantLayer, QuantLinear

from .freeze import check_no_aux

INSTALL_HINT = "pip install qdiff-toolkit[torchao]"
RECORD_KEY = "_qdiff_torchao"
MIN_TORCHAO = (0, 16)


class TorchaoExportError(QdiffError, ValueError):
    """A student has layers that the torchao export cannot express."""


class TorchaoMissingError(QdiffError, ImportError):
    """torchao (>= 0.16) is not installed; the message names the extra to install."""


def require_torchao() -> None:
    """ImportError with the install hint unless torchao >= 0.16 is importable.

    Raises:
        TorchaoMissingError: torchao is missing, or older than 0.16.
    """
    try:
        import torchao
    except ImportError:
        raise TorchaoMissingError(f"export.format=torchao needs torchao (>= 0.16): {INSTALL_HINT}") from None
    version = tuple(int(part) for part in torchao.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_TORCHAO:
        raise TorchaoMissingError(f"export.format=torchao needs torchao >= 0.16, found {torchao.__version__}: "
                          f"{INSTALL_HINT}")


@dataclass
class _Portable:
    """One quantized layer as the torchao export sees it, from a student or an export."""

    linear: bool
    weight_bits: int
    act_bits: int
    act_symmetric: bool
    codes: Callable[[], torch.Tensor]  # integer codes, weight-shaped
    zero_point: torch.Tensor  # per output channel (rounded)
    scale: torch.Tensor  # per output channel
    qdiff_only: Optional[str]  # why torchao cannot compute it (None: it can)
    replaced: bool  # its input grid is not torchao's full-range per-token int8
    module: Callable[[], nn.Module]  # the float module (weight: the dequantized codes)


def _reason(act_bits: int, rotated: bool, split: bool, grouped: bool) -> Optional[str]:
    if rotated:
        return "rotated input"
    if split:
        return "split input"
    if act_bits < 8:
        return f"{act_bits}-bit activations"
    if grouped:
        return "per-group activations"
    return None


def _from_student(layer: QuantLayer) -> _Portable:
    quantizer, wq = layer.act_quantizer, layer.weight_quantizer
    ratio = getattr(quantizer, "clip_ratio", None)  # None: a static / temporal table
    symmetric = bool(getattr(quantizer, "symmetric", False))
    replaced = ratio is None or symmetric or bool((ratio.detach().clamp_min(1e-4) != 1).any())
    return _Portable(
        isinstance(layer, QuantLinear), layer.weight_bits, layer.act_bits, symmetric,
        lambda: wq.codes(layer.adapted_weight()), wq.export_params()[1],
        wq.export_params()[0],
        _reason(layer.act_bits, layer.input_rotation is not None, bool(layer.act_split),
                bool(getattr(quantizer, "group_size", 0))),
        replaced, lambda: layer.to_module().requires_grad_(False))


def _from_integer(layer: nn.Module, empty: nn.Module) -> _Portable:
    """An integer layer of a qdiff export; `empty` is the float module it replaced."""
    spec = layer.spec
    ratio = getattr(getattr(layer, "act", None), "clip_ratio", None)  # None: a per-timestep table
    replaced = (spec.act_granularity != "per_token" or spec.act_symmetric
                or ratio is None or bool((ratio != 1).any()))
    reason = _reason(spec.act_bits, spec.input_rotation != "none", bool(spec.act_split),
                     bool(spec.act_group_size))

    def module() -> nn.Module:
        float_module = copy.deepcopy(empty).to_empty(device=layer.weight_scale.device)
        shape = (-1,) + (1,) * (len(spec.weight_shape) - 1)
        weight = ((layer.weight_codes().float() - layer.weight_zero_point.view(shape).float())
                  * layer.weight_scale.view(shape))
        float_module.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            float_module.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        return float_module

    if reason is not None:  # split layers hold their codes in parts: not needed to refuse
        return _Portable(spec.type == "Linear", spec.weight_bits, spec.act_bits, spec.act_symmetric,
                         None, None, None, reason, replaced, None)
    return _Portable(spec.type == "Linear", spec.weight_bits, spec.act_bits, spec.act_symmetric,
                     layer.weight_codes, layer.weight_zero_point.float(), layer.weight_scale.float(),
                     None, replaced, module)


def _float_reason(layer: _Portable) -> Optional[str]:
    """Why a layer torchao could compute stays float (None: it becomes an Int8Tensor)."""
    if not layer.linear:
        return "convolution (torchao has no int8 convolution)"
    codes = layer.codes().to(torch.int32) - layer.zero_point.to(torch.int32).view(-1, 1)
    if int(codes.max()) > 127 or int(codes.min()) < -128:  # 8-bit asymmetric, zero point off-centre
        return f"{layer.weight_bits}-bit weight codes beyond int8 once centred"
    return None


@torch.no_grad()
def _int8_weight(layer: _Portable, dtype: torch.dtype) -> torch.Tensor:
    """A torchao Int8Tensor holding `layer`'s centred codes and step sizes, with dynamic
    per-row int8 activations."""
    from torchao.quantization import Int8Tensor, MappingType, PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

    codes = layer.codes().to(torch.int32)
    centred = codes - layer.zero_point.to(torch.int32).view(-1, 1)
    mapping = MappingType.SYMMETRIC if layer.act_symmetric else MappingType.ASYMMETRIC
    return Int8Tensor(centred.to(torch.int8).contiguous(), layer.scale.float().view(-1, 1).clone(),
                      [1, codes.shape[1]], dtype,
                      act_quant_kwargs=QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=mapping))


def torchao_model(student: nn.Module, recipe: Optional[Mapping[str, Any]] = None) -> ModelMixin:
    """The diffusers model of `student`'s own class with torchao int8 Linear weights
    (see the module docstring); the student is unchanged. Raises `TorchaoExportError`
    naming the layers only qdiff computes.

    Args:
        student: A quantized, calibrated student (LoRA merged or not).
        recipe: Recorded as the recipe in the model's `quantization_config`.

    Returns:
        A model of the student's diffusers class, loadable without qdiff.

    Raises:
        TorchaoExportError: The student has layers torchao cannot express.
        TorchaoMissingError: torchao >= 0.16 is not installed.
    """
    require_torchao()
    layers = dict(iter_quant_layers(student))
    check_no_aux(layers.items())
    portable = {name: _from_student(layer) for name, layer in layers.items()}
    return _build(type(student), student.config, student.state_dict(), portable, recipe)


def torchao_model_from_export(model: nn.Module) -> ModelMixin:
    """The same for a loaded qdiff export's denoiser (a `Quantized<X>`): its stored codes
    and scales become torchao tensors, so an export converts without its student.

    Args:
        model: A loaded qdiff export's denoiser.

    Returns:
        A model of its base diffusers class, loadable without qdiff.

    Raises:
        TypeError: `model` is not a `Quantized<X>`.
        TorchaoExportError: The export has layers torchao cannot express.
        TorchaoMissingError: torchao >= 0.16 is not installed.
    """
    require_torchao()
    from .models import QuantizedModelMixin

    if not isinstance(model, QuantizedModelMixin):
        raise TypeError(f"torchao_model_from_export takes a qdiff export's denoiser (Quantized<X>), "
                        f"not a {type(model).__name__}.")
    base = next(cls for cls in type(model).__mro__[1:]
                if issubclass(cls, ModelMixin) and not issubclass(cls, QuantizedModelMixin))
    qconfig = model.config["quantization_config"]
    config = {key: value for key, value in model.config.items() if key != "quantization_config"}
    with init_empty_weights():
        empty = base.from_config(config)
    portable = {name: _from_integer(model.get_submodule(name), empty.get_submodule(name))
                for name in qconfig["layers"]}
    return _build(base, config, model.state_dict(), portable, qconfig.get("recipe"))


def _build(base: type, config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
           layers: Mapping[str, _Portable], recipe: Optional[Mapping[str, Any]]) -> ModelMixin:
    from diffusers import TorchAoConfig
    from diffusers.quantizers.torchao import TorchAoHfQuantizer
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType, PerRow

    refused = {name: layer.qdiff_only for name, layer in layers.items() if layer.qdiff_only}
    if refused:
        listed = ", ".join(f"{name} ({reason})" for name, reason in list(refused.items())[:8])
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise TorchaoExportError(
            f"Cannot export to torchao: {len(refused)} layer(s) need qdiff's kernels: {listed}{more}; "
            f"export them with export.format=qdiff, or train without 4-bit activations, "
            f"rotated, split or grouped inputs.")
    with init_empty_weights():
        model = base.from_config(dict(config))
    state = {key: value.detach().clone() for key, value in state.items()
             if not any(key.startswith(name + ".") for name in layers)}
    float_layers, replaced = {}, []
    for name, layer in layers.items():
        module = layer.module()
        reason = _float_reason(layer)
        if reason is None:
            module.weight = nn.Parameter(_int8_weight(layer, module.weight.dtype), requires_grad=False)
            if layer.replaced:
                replaced.append(name)
        else:
            float_layers[name] = reason + ": float weight = qdiff's dequantized codes, float input"
        model.set_submodule(name, module)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in result.missing_keys if not any(key.startswith(n + ".") for n in layers)]
    if missing or result.unexpected_keys:
        raise ValueError(f"The model does not match a fresh {base.__name__}: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}.")
    symmetric = any(layer.act_symmetric for layer in layers.values())
    quant_type = Int8DynamicActivationInt8WeightConfig(
        granularity=PerRow(), act_mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC)
    ao_config = TorchAoConfig(quant_type, modules_to_not_convert=list(float_layers) or None)
    quantizer = TorchAoHfQuantizer(ao_config, pre_quantized=True)
    quantizer.validate_environment()  # sets what save_pretrained asks of it (no offload)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    weight_bits = sorted({layer.weight_bits for layer in layers.values()})
    model.register_to_config(quantization_config=ao_config.to_dict(), **{RECORD_KEY: {
        "weights": f"qdiff's {'/'.join(map(str, weight_bits))}-bit codes centred on their zero point, "
                   f"per-output-channel scales (torchao Int8Tensor)",
        "activations": "dynamic per-token int8 (torchao), Linear layers",
        "int8_layers": sorted(set(layers) - set(float_layers)),
        "float_layers": float_layers,
        "dynamic_activations_replace": replaced,
        "recipe": dict(recipe or {}),
    }})
    return model.eval()
