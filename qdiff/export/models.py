"""Denoiser classes whose quantized layers are integer layers, loadable by plain diffusers.

diffusers 0.42 has no public way to register a quantizer, but it does load a component
class from any module the caller has already imported: `model_index.json` names the
component as `["qdiff.export.models", "QuantizedUNet2DConditionModel"]`, and once
`import qdiff` has run (it imports this module), `DiffusionPipeline.from_pretrained`
finds this module in `sys.modules` and takes the class from it by name
(`getattr(module, "QuantizedUNet2DConditionModel")`, in
`diffusers.pipelines.pipeline_loading_utils`), then calls its `from_pretrained`.

The classes are therefore not written out one per model: `quantized_class_for(student)`
generates `Quantized<X>` = `(QuantizedModelMixin, X)` for any model class `X` that the
`diffusers` package exports (a `ModelMixin` subclass: UNets, DiT, Flux, SD3, Qwen-Image,
Wan, CogVideoX, ...), once per process, with this module as its `__module__` -- which is
what `pipeline.save_pretrained` writes into `model_index.json`. The module's `__getattr__`
(PEP 562) answers the same name with the same class, so a fresh process that has only run
`import qdiff` loads an export of any such model, and pickle finds the class by name too.
Each class subclasses the diffusers model it quantizes, so pipelines accept it where they
expect that model (`isinstance(pipe.unet, UNet2DConditionModel)`), and its
`save_pretrained` is what `pipeline.save_pretrained` calls: exports round-trip.

The model is built from its config with empty (meta) float weights; the layers named
in `quantization_config["layers"]` become integer layers; then the safetensors file fills
both, after the checks in `serialization` (no pickle is read or written).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from qdiff.kernels import check_kernel
from qdiff.quant import TimestepContext, iter_quant_layers, timestep_context

from .format import ExportFormatError, LayerSpec, check_quantization_config, quantization_config
from .freeze import check_no_aux, empty_int_layer, freeze_layer
from .int_layers import INT_LAYERS, IntLayer
from .split_layer import SplitIntLayer
from .serialization import check_state, load_weights, save_weights

# Loading arguments diffusers passes that change nothing for a whole-model CPU/GPU load.
_HARMLESS_LOAD_ARGS = {"low_cpu_mem_usage", "disable_mmap", "use_safetensors", "local_files_only",
                       "offload_state_dict"}


def _check_load_args(kwargs: Mapping[str, Any]) -> None:
    unsupported = {key: value for key, value in kwargs.items()
                   if key not in _HARMLESS_LOAD_ARGS and value not in (None, False)}
    if kwargs.get("use_safetensors") is False:
        unsupported["use_safetensors"] = False
    if unsupported:
        raise NotImplementedError(f"qdiff integer models do not support {unsupported} when loading; "
                                  f"load without them, then move the model with `.to(device)`.")


def _install_int_layers(model: nn.Module, specs: Mapping[str, LayerSpec],
                        context: TimestepContext, source: Union[Path, str]) -> None:
    """Replace each named float layer of the (empty) model by an empty integer layer."""
    for name, spec in specs.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ExportFormatError(f"{source}: layer '{name}' does not exist in this model.") from None
        int_cls = INT_LAYERS[spec.type]
        if type(module) is not int_cls.float_type:
            raise ExportFormatError(f"{source}: layer '{name}' is a {type(module).__name__} in "
                                    f"the model, but the export stores a {spec.type}.")
        model.set_submodule(name, empty_int_layer(module, spec, context))


def _adopt_float_state(model: nn.Module, student: nn.Module, frozen: Mapping[str, nn.Module]) -> None:
    """Give the empty model copies of the student's tensors outside the quantized layers
    (copies: a run may go on training the student after exporting it)."""
    state = {key: value.detach().clone() for key, value in student.state_dict().items()
             if not any(key.startswith(name + ".") for name in frozen)}
    result = model.load_state_dict(state, strict=False, assign=True)
    int_keys = {f"{name}.{key}" for name, layer in frozen.items() for key in layer.state_dict()}
    missing = sorted(set(result.missing_keys) - int_keys)
    if missing or result.unexpected_keys:
        raise ValueError(f"The student does not match a fresh {type(model).__name__}: missing "
                         f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}.")


class QuantizedModelMixin:
    """Build from a student, save and load as packed integer weights (first in the MRO)."""

    @classmethod
    def _empty(cls, config: Mapping[str, Any], specs: Mapping[str, LayerSpec],
               source: Union[Path, str]) -> tuple[ModelMixin, TimestepContext]:
        with init_empty_weights():  # float weights on the meta device, buffers real
            model = cls.from_config(dict(config))
        context = timestep_context(model)
        _install_int_layers(model, specs, context, source)
        return model, context

    @classmethod
    @torch.no_grad()
    def from_student(cls, student: nn.Module, recipe: Mapping[str, Any]) -> ModelMixin:
        """The integer model of a calibrated (and trained) student; the student is unchanged.

        Pass the bare model (not a DDP / compiled wrapper); `recipe` is recorded as is.
        """
        layers = dict(iter_quant_layers(student))
        check_no_aux(layers.items())
        model, context = cls._empty(student.config, {}, "student")
        frozen = {name: freeze_layer(name, layer, context) for name, layer in layers.items()}
        for name, int_layer in frozen.items():
            model.set_submodule(name, int_layer)
        _adopt_float_state(model, student, frozen)
        specs = {name: int_layer.spec for name, int_layer in frozen.items()}
        model.register_to_config(quantization_config=quantization_config(specs, recipe, ""))
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Path],
                        subfolder: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None,
                        dtype: Optional[torch.dtype] = None, **kwargs: Any) -> ModelMixin:
        """Load an export's denoiser folder (or `subfolder` of a pipeline folder).

        `dtype` (diffusers' name since 0.42; `torch_dtype` is the name diffusers' pipeline
        loader still passes) is the dtype of the float parts; the integer codes stay integer.
        """
        _check_load_args(kwargs)
        torch_dtype = dtype if dtype is not None else torch_dtype
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise ExportFormatError(f"{config_file}: missing; point at the denoiser folder of a "
                                    f"qdiff export (it holds config.json and the weights).")
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ExportFormatError(f"{config_file}: not valid JSON ({error}).") from None
        if config.get("_class_name") != cls.__name__:
            raise ExportFormatError(f"{config_file}: holds a {config.get('_class_name')}, not a "
                                    f"{cls.__name__}.")
        specs = check_quantization_config(config.get("quantization_config"), config_file)
        qconfig = config["quantization_config"]
        state = load_weights(folder, qconfig["weights_sha256"])
        model, _ = cls._empty(config, specs, config_file)
        check_state(state, model.state_dict(), folder / qconfig["weights_file"])
        model.load_state_dict(state, strict=True, assign=True)
        model.register_to_config(quantization_config=qconfig)
        model.eval()
        return model.to(torch_dtype) if torch_dtype is not None else model

    def set_qdiff_kernel(self, kernel: str) -> "QuantizedModelMixin":
        """Run the integer layers on `kernel`: "auto" (default), "reference", or a registered
        kernel ("int8", "onednn", "float" built in; `qdiff.kernels.kernel_names()` lists all).

        Like diffusers' `set_attention_backend`: `pipe.unet.set_qdiff_kernel("int8")`. All
        kernels give the same numbers, up to the float rounding of the rescale; see
        `qdiff.kernels.registry`. Returns the model.
        """
        check_kernel(kernel)
        for module in self.modules():
            if isinstance(module, IntLayer):
                module.set_kernel(kernel)
        return self

    def load_lora_adapter(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' `load_lora_adapter` (what `pipe.load_lora_weights` calls), with LoRA layers
        for the integer layers: a float branch beside each (see `qdiff.export.lora`)."""
        from .lora import enable_peft

        enable_peft()
        return super().load_lora_adapter(*args, **kwargs)

    def add_adapter(self, *args: Any, **kwargs: Any) -> Any:
        """diffusers' `add_adapter` (a fresh PEFT adapter), on the integer layers too."""
        from .lora import enable_peft

        enable_peft()
        return super().add_adapter(*args, **kwargs)

    def fuse_lora(self, *args: Any, **kwargs: Any) -> None:
        """Refused: a LoRA stays a float branch beside the integer layers (`qdiff.export.lora`)."""
        from .lora import FUSE_MESSAGE, LoraFusionError

        raise LoraFusionError(FUSE_MESSAGE)

    def save_pretrained(self, save_directory: Union[str, Path], safe_serialization: bool = True,
                        variant: Optional[str] = None, max_shard_size: Optional[Any] = None,
                        use_flashpack: bool = False) -> None:
        """Write config.json (with the weights' checksum) and the one safetensors file.

        The keyword arguments are those `DiffusionPipeline.save_pretrained` may pass; asking
        for anything but one unsharded safetensors file is refused rather than ignored.
        """
        if not safe_serialization or variant or max_shard_size is not None or use_flashpack:
            raise NotImplementedError("qdiff integer models save as one safetensors file: no "
                                      "pickle, variants, shards or flashpack.")
        if getattr(self, "peft_config", None):
            raise ValueError("This qdiff model has LoRA adapters loaded; an export holds the integer "
                             "model only. Call `unload_lora_weights()` (or the model's "
                             "`unload_lora()`) before saving; save the LoRA with "
                             "`save_lora_weights`.")
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        sha256 = save_weights(self.state_dict(), folder)
        self.register_to_config(quantization_config={**self.config["quantization_config"],
                                                     "weights_sha256": sha256})
        self.save_config(folder)


def _int_layer_at(model: nn.Module, name: str) -> Optional[nn.Module]:
    """The integer layer `name` of `model` (behind a LoRA wrapper), or None."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)
    return module if isinstance(module, (IntLayer, SplitIntLayer)) else None


def _patch_flux_lora_loader() -> None:
    """FLUX's `load_lora_weights` zero-pads a LoRA's A to a wider layer (Control LoRA), reading
    each targeted layer's float `weight`: for the integer layers of a qdiff model it checks the
    widths against the layer's spec instead (an integer layer cannot be widened); float layers
    and float models go through diffusers' own code."""
    try:
        from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    except ImportError:  # pragma: no cover - a diffusers without FLUX LoRA
        return
    original = FluxLoraLoaderMixin.__dict__.get("_maybe_expand_lora_state_dict")
    if original is None or getattr(original.__func__, "_qdiff", False):
        return

    def _maybe_expand_lora_state_dict(cls, transformer, lora_state_dict):
        if not isinstance(transformer, QuantizedModelMixin):
            return original.__func__(cls, transformer, lora_state_dict)
        prefix = f"{cls.transformer_name}."
        integer = {}
        for key in list(lora_state_dict):
            name = key.removeprefix(prefix).rsplit(".lora_", 1)[0]
            layer = _int_layer_at(transformer, name)
            if layer is None:
                continue
            value = integer[key] = lora_state_dict.pop(key)
            width = layer.spec.weight_shape[1] * getattr(getattr(layer, "parts", [layer])[0], "groups", 1)
            if key.endswith("lora_A.weight") and value.shape[1] != width:
                raise ValueError(f"The LoRA's '{name}' takes {value.shape[1]} input features, the "
                                 f"integer layer {width}: qdiff integer layers cannot be widened "
                                 f"(Control LoRA).")
        expanded = original.__func__(cls, transformer, lora_state_dict) if lora_state_dict else {}
        return {**expanded, **integer}

    _maybe_expand_lora_state_dict._qdiff = True
    FluxLoraLoaderMixin._maybe_expand_lora_state_dict = classmethod(_maybe_expand_lora_state_dict)


PREFIX = "Quantized"
_GENERATED: dict[type, type] = {}  # diffusers model class -> its generated integer class
_LOCK = threading.Lock()


def _diffusers_model_class(name: str) -> Optional[type]:
    """`diffusers.<name>` if that is a model class (a ModelMixin subclass), else None."""
    try:
        base = getattr(diffusers, name)
    except AttributeError:
        return None
    return base if isinstance(base, type) and issubclass(base, ModelMixin) else None


def _generate(base: type) -> type:
    with _LOCK:
        cls = _GENERATED.get(base)
        if cls is None:
            name = PREFIX + base.__name__
            cls = _GENERATED[base] = type(name, (QuantizedModelMixin, base), {
                "__module__": __name__, "__qualname__": name,
                "__doc__": f"diffusers' {base.__name__} with integer layers (generated by "
                           f"qdiff.export.models.quantized_class_for)."})
        return cls


def quantized_class_for(student: Union[nn.Module, type]) -> type:
    """The integer class `Quantized<X>` for a student of diffusers model class `X` (or for
    the class `X` itself): generated on first use, the same object afterwards.

    `X` must be a `ModelMixin` subclass that the `diffusers` package exports under its own
    name, since that name is how a loading process finds the class again.

    Args:
        student: A student, or its diffusers model class.

    Returns:
        The class `Quantized<X>`.

    Raises:
        ValueError: `X` is not a `ModelMixin` that `diffusers` exports under its name.
    """
    base = student if isinstance(student, type) else type(student)
    if isinstance(base, type) and issubclass(base, QuantizedModelMixin):
        base = next(b for b in base.__mro__[1:] if not issubclass(b, QuantizedModelMixin))
    if _diffusers_model_class(base.__name__) is not base:
        raise ValueError(f"Cannot export a {base.__module__}.{base.__qualname__}: qdiff exports "
                         f"diffusers model classes (ModelMixin subclasses exported by the diffusers "
                         f"package, e.g. UNet2DConditionModel, FluxTransformer2DModel).")
    return _generate(base)


def __getattr__(name: str) -> type:
    """`Quantized<X>` for a diffusers model class `X` (PEP 562): how diffusers and pickle
    find a generated class by the name recorded in `model_index.json`."""
    base = _diffusers_model_class(name[len(PREFIX):]) if name.startswith(PREFIX) else None
    if base is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _generate(base)


def __dir__() -> list[str]:
    return sorted({*globals(), *(cls.__name__ for cls in _GENERATED.values())})


_patch_flux_lora_loader()
