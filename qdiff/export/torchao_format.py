"""`export.format: torchao`: a student as a stock diffusers model with torchao int8 weights.

The portable export needs no qdiff to load: its denoiser is the plain diffusers class
(`UNet2DConditionModel`, `FluxTransformer2DModel`, ...), and `config.json` carries the
`quantization_config` of diffusers' own torchao quantizer (`TorchAoConfig`), so
`DiffusionPipeline.from_pretrained(path, torch_dtype=...)` loads it wherever torchao
(>= 0.16) is installed. diffusers saves the torchao tensors as safetensors (torchao's
`flatten_tensor_state_dict`).

What each quantized layer of the student becomes:

* Linear: its weight is a torchao `Int8Tensor` built from qdiff's own grid, not
  re-quantized: the codes centred on their zero point (q - zp: 4-bit asymmetric codes
  lie in [-15, 15]) and the per-output-channel step sizes, so dequant(W) is the student's
  Q_w(W0 + B @ A) exactly. Its input is quantized on the fly per token (per row) to int8,
  asymmetric or symmetric as the student's activations are (`act_quant_kwargs` of the
  tensor: torchao's `Int8DynamicActivationInt8WeightConfig` layout). For a student with
  8-bit `dynamic_per_token` activations and clip ratio 1, that is the student's own
  activation grid. Learned clip ratios < 1 and `temporal` (per-timestep) step-size tables
  have no torchao form: those inputs get the full-range dynamic per-token grid, and the
  layers are named in config.json under `_qdiff_torchao["dynamic_activations_replace"]`.
* Convolution: torchao has no int8 convolution, so it stays a float convolution whose
  weight is the student's dequantized Q_w (activations float). Named in
  `quantization_config["modules_to_not_convert"]` and `_qdiff_torchao["float_layers"]`.
* Refused (`TorchaoExportError`, one line naming the layers): what only qdiff's kernels
  compute -- activations below 8 bits, Hadamard-rotated inputs, split (concatenated)
  inputs, per-group activations within a token, and weight codes that do not fit int8
  once centred (8-bit asymmetric weights). Export those with `export.format: qdiff`.

diffusers drops config keys starting with "_" when it builds the model, so the
`_qdiff_torchao` record is for people and tools only.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

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


def require_torchao() -> None:
    """ImportError with the install hint unless torchao >= 0.16 is importable."""
    try:
        import torchao
    except ImportError:
        raise ImportError(f"export.format=torchao needs torchao (>= 0.16): {INSTALL_HINT}") from None
    version = tuple(int(part) for part in torchao.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_TORCHAO:
        raise ImportError(f"export.format=torchao needs torchao >= 0.16, found {torchao.__version__}: "
                          f"{INSTALL_HINT}")


def _qdiff_only(layer: QuantLayer) -> Optional[str]:
    """Why `layer` needs qdiff's kernels (None: torchao can compute it)."""
    if layer.input_rotation is not None:
        return "rotated input"
    if layer.act_split:
        return "split input"
    quantizer = layer.act_quantizer
    if layer.act_bits < 8:
        return f"{layer.act_bits}-bit activations"
    if getattr(quantizer, "group_size", 0):
        return "per-group activations"
    if isinstance(layer, QuantLinear):
        wq = layer.weight_quantizer
        zero = wq.zero_point.detach().round()
        if float((wq.qmax - zero).max()) > 127 or float((wq.qmin - zero).min()) < -128:
            return f"{wq.bits}-bit weight codes beyond int8 once centred"
    return None


def _replaced_activations(layer: QuantLayer) -> bool:
    """True where the student's input grid is not torchao's full-range per-token int8."""
    quantizer = layer.act_quantizer
    ratio = getattr(quantizer, "clip_ratio", None)
    if ratio is None:  # a static / temporal table
        return True
    return bool((ratio.detach().clamp_min(1e-4) != 1).any()) or bool(getattr(quantizer, "symmetric", False))


@torch.no_grad()
def _int8_weight(layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """A torchao Int8Tensor holding `layer`'s centred codes and step sizes, with dynamic
    per-row int8 activations."""
    from torchao.quantization import Int8Tensor, MappingType, PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import QuantizeTensorToInt8Kwargs

    wq = layer.weight_quantizer
    weight = layer.adapted_weight()
    codes = wq.codes(weight).to(torch.int32)
    zero = wq.zero_point.detach().round().to(torch.int32).view(-1, 1)
    scale = wq.scale.detach().clamp_min(1e-8).float().view(-1, 1)
    mapping = MappingType.SYMMETRIC if getattr(layer.act_quantizer, "symmetric", False) else MappingType.ASYMMETRIC
    return Int8Tensor((codes - zero).to(torch.int8).contiguous(), scale, [1, codes.shape[1]], dtype,
                      act_quant_kwargs=QuantizeTensorToInt8Kwargs(granularity=PerRow(), mapping_type=mapping))


def torchao_model(student: nn.Module, recipe: Optional[Mapping[str, Any]] = None) -> ModelMixin:
    """The diffusers model of `student`'s own class with torchao int8 Linear weights
    (see the module docstring); the student is unchanged. Raises `TorchaoExportError`
    naming the layers only qdiff computes."""
    require_torchao()
    from diffusers import TorchAoConfig
    from diffusers.quantizers.torchao import TorchAoHfQuantizer
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType, PerRow

    layers = dict(iter_quant_layers(student))
    check_no_aux(layers.items())
    refused = {name: reason for name, layer in layers.items() if (reason := _qdiff_only(layer))}
    if refused:
        listed = ", ".join(f"{name} ({reason})" for name, reason in list(refused.items())[:8])
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise TorchaoExportError(
            f"Cannot export to torchao: {len(refused)} layer(s) need qdiff's kernels: {listed}{more}; "
            f"export them with export.format=qdiff, or train without 4-bit activations, "
            f"rotated, split or grouped inputs.")
    base = type(student)
    with init_empty_weights():
        model = base.from_config(dict(student.config))
    state = {key: value.detach().clone() for key, value in student.state_dict().items()
             if not any(key.startswith(name + ".") for name in layers)}
    float_layers, replaced, dtypes = [], [], set()
    for name, layer in layers.items():
        module = layer.to_module().requires_grad_(False)
        dtype = module.weight.dtype
        dtypes.add(dtype)
        if isinstance(layer, QuantLinear):
            module.weight = nn.Parameter(_int8_weight(layer, dtype), requires_grad=False)
            if _replaced_activations(layer):
                replaced.append(name)
        else:
            float_layers.append(name)
        model.set_submodule(name, module)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [key for key in result.missing_keys if not any(key.startswith(n + ".") for n in layers)]
    if missing or result.unexpected_keys:
        raise ValueError(f"The student does not match a fresh {base.__name__}: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}.")
    symmetric = any(getattr(layer.act_quantizer, "symmetric", False) for layer in layers.values())
    quant_type = Int8DynamicActivationInt8WeightConfig(
        granularity=PerRow(), act_mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC)
    config = TorchAoConfig(quant_type, modules_to_not_convert=float_layers or None)
    quantizer = TorchAoHfQuantizer(config, pre_quantized=True)
    quantizer.validate_environment()  # sets what save_pretrained asks of it (no offload)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    weight_bits = sorted({layer.weight_bits for layer in layers.values()})
    model.register_to_config(quantization_config=config.to_dict(), **{RECORD_KEY: {
        "weights": f"qdiff's {'/'.join(map(str, weight_bits))}-bit codes centred on their zero point, "
                   f"per-output-channel scales (torchao Int8Tensor)",
        "activations": "dynamic per-token int8 (torchao), Linear layers",
        "int8_layers": sorted(set(layers) - set(float_layers)),
        "float_layers": {name: "convolution: float weight = qdiff's dequantized codes, "
                               "float activations" for name in float_layers},
        "dynamic_activations_replace": replaced,
        "recipe": dict(recipe or {}),
    }})
    return model.eval()
