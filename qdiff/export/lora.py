"""User LoRAs on an export: a float low-rank branch beside each integer layer.

    y = int_layer(x) + sum_a scale_a * B_a(A_a(dropout(x)))

diffusers' LoRA API (`pipe.load_lora_weights`, `set_adapters`, `disable_lora` /
`enable_lora`, `unload_lora_weights`, `delete_adapters`) works on an export as on the float
pipeline: diffusers converts the file (kohya / civitai keys included), builds the
`LoraConfig` and calls PEFT's `inject_adapter_in_model`, which wraps each targeted layer in a
LoRA layer. PEFT wraps `nn.Linear` / `nn.Conv*d` only; `enable_peft` (called by
`QuantizedModelMixin.load_lora_adapter` and `add_adapter`, so before any LoRA reaches a qdiff
model) adds a dispatcher in front of PEFT's own that wraps an `IntLinear`, `IntConv2d`,
`IntConv3d` or `SplitIntLayer` in the classes below. They are PEFT's own `lora.Linear` /
`lora.Conv2d` / `lora.Conv3d` -- same A/B modules, scaling, adapters, forward -- except that
they read the layer's shape from its `spec` (an integer layer has no float `weight`, and
none is made), build a conv LoRA's A/B from the layer's geometry, and refuse to merge.

The branch runs beside the integer layer, in float (the LoRA's own dtype), on the layer's
unquantized input, exactly as on the float pipeline: the LoRA's contribution to each layer
is the float pipeline's to float rounding. SVDQuant keeps its low-rank branch the same way.

`fuse_lora` is refused (`LoraFusionError`). Fusing would mean re-quantizing W + s*B@A onto
the integer grid: a LoRA's update is mostly far below a 4-bit step, so it would largely
round away (or, with fresh scales, change the calibrated layer and its exactness checks),
and `unfuse_lora` could not give back the exported codes. The unfused branch costs
r * (in + out) multiply-adds per token, small beside the layer, and keeps
`unload_lora_weights` exact.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch
from peft.tuners.lora import layer as peft_lora
from peft.tuners.lora import model as peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .int_layers import IntConv2d, IntConv3d, IntLayer, IntLinear
from .split_layer import SplitIntLayer

FUSE_MESSAGE = ("qdiff integer layers keep a LoRA as a float branch beside the integer weights "
                "and do not fuse it: re-quantizing W + B@A on the layer's grid would round most of "
                "the LoRA away and could not be undone. Use the LoRA unfused (set_adapters with "
                "weights, disable_lora, unload_lora_weights all work); see 'Your LoRAs on an export' "
                "in docs/guides/export-and-inference.md.")


class LoraFusionError(NotImplementedError):
    """`fuse_lora` on a qdiff integer model (see the module docstring for why)."""


def _storage(layer: nn.Module) -> IntLayer:
    """An integer layer holding the codes (the first part of a split layer)."""
    return layer.parts[0] if isinstance(layer, SplitIntLayer) else layer


def _spec_features(layer: nn.Module) -> tuple[int, int]:
    """(in, out) of the whole layer, from its spec (a conv's in counts every group)."""
    out, per_group = layer.spec.weight_shape[:2]
    return per_group * getattr(_storage(layer), "groups", 1), out


def _device_and_dtype(layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the branch lives: the layer's device and the model's float dtype (its bias's, else
    its weight scales'; both follow `model.to(dtype)` as a float weight would)."""
    storage = _storage(layer)
    source = storage.bias if storage.bias is not None else storage.weight_scale
    return storage.weight_scale.device, source.dtype


def _real(module: nn.Module) -> nn.Module:
    """The integer layer behind a conv stand-in (see `_stand_in`), else `module`."""
    return module.__dict__.get("_qdiff_int_layer", module)


class _IntLoraMixin:
    """What PEFT's LoRA layers need to sit on an integer layer (first in the MRO)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return _spec_features(_real(module))

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        real = _real(base_layer)
        if isinstance(real, (IntLayer, SplitIntLayer)):
            return _device_and_dtype(real)
        return super()._get_base_layer_device_and_dtype(base_layer)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise LoraFusionError(FUSE_MESSAGE)

    def unmerge(self) -> None:  # nothing is ever merged
        return None


class IntLoraLinear(_IntLoraMixin, peft_lora.Linear):
    """PEFT's `lora.Linear` around an `IntLinear` (or a split Linear)."""


def _stand_in(layer: nn.Module) -> nn.Module:
    """A float conv on the meta device with the integer conv's geometry (no memory): what
    PEFT's conv LoRA reads to build A (same kernel, stride, padding) and B (1x1)."""
    storage = _storage(layer)
    in_features, out_features = _spec_features(layer)
    conv = storage.float_type(in_features, out_features, storage.kernel_size, storage.stride,
                              storage.padding, storage.dilation, storage.groups, bias=False,
                              padding_mode=storage.padding_mode, device="meta")
    conv.__dict__["_qdiff_int_layer"] = layer
    return conv


class _IntLoraConv(_IntLoraMixin):
    """PEFT's conv LoRA around an integer conv: built against a meta stand-in, then pointed at
    the integer layer (PEFT makes A and B as `type(base_layer)`, which must be a float conv)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        layer = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        super().__init__(_stand_in(layer), adapter_name, **kwargs)
        self.base_layer = base_layer

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        real = self.base_layer
        layer = self.get_base_layer()
        self.base_layer = _stand_in(_real(layer))
        try:
            super().update_layer(adapter_name, *args, **kwargs)
        finally:
            self.base_layer = real


class IntLoraConv2d(_IntLoraConv, peft_lora.Conv2d):
    """PEFT's `lora.Conv2d` around an `IntConv2d` (or a split one)."""


class IntLoraConv3d(_IntLoraConv, peft_lora.Conv3d):
    """PEFT's `lora.Conv3d` around an `IntConv3d` (or a split one)."""


def lora_class_for(layer: nn.Module) -> Optional[type]:
    """The LoRA layer class for an integer layer, None for any other module.

    Args:
        layer: Any module.

    Returns:
        `IntLoraLinear`, `IntLoraConv2d` or `IntLoraConv3d`, or None.
    """
    if isinstance(layer, SplitIntLayer):
        layer = _storage(layer)
    for int_cls, lora_cls in ((IntLinear, IntLoraLinear), (IntConv2d, IntLoraConv2d),
                              (IntConv3d, IntLoraConv3d)):
        if isinstance(layer, int_cls):
            return lora_cls
    return None


def dispatch_int_layer(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any
                       ) -> Optional[nn.Module]:
    """A PEFT LoRA dispatcher (see `peft.tuners.lora.layer.dispatch_default`) for qdiff's
    integer layers; None for anything else, which PEFT's own dispatchers then take.

    Args:
        target: The module PEFT is about to wrap.
        adapter_name: The adapter's name.
        config: PEFT's `LoraConfig`.
        **kwargs: PEFT's per-layer LoRA arguments (rank, alpha, dropout, ...).

    Returns:
        The LoRA layer around `target`, or None.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    lora_cls = lora_class_for(base)
    if lora_cls is None:
        return None
    return lora_cls(target, adapter_name, config=config, **kwargs)


_LOCK = threading.Lock()
_ENABLED = False


def enable_peft() -> None:
    """Let PEFT put LoRA layers on qdiff's integer layers, in this process (idempotent).

    PEFT picks a LoRA layer class through the dispatchers of
    `LoraModel._create_new_module`; diffusers builds the `LoraConfig` itself, so the
    per-config `_register_custom_module` cannot be reached from `load_lora_weights`. This
    puts `dispatch_int_layer` in front of PEFT's dispatchers instead; every other module
    goes to PEFT unchanged.
    """
    global _ENABLED
    with _LOCK:
        if _ENABLED:
            return
        original = peft_model.LoraModel._create_new_module

        def _create_new_module(lora_config, adapter_name, target, **kwargs):
            new_module = dispatch_int_layer(target, adapter_name, lora_config, **kwargs)
            if new_module is not None:
                return new_module
            return original(lora_config, adapter_name, target, **kwargs)

        _create_new_module.__wrapped__ = original
        peft_model.LoraModel._create_new_module = staticmethod(_create_new_module)
        _ENABLED = True
