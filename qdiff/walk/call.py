"""One denoiser call as the pipeline made it: what was asked, and what the teacher answered.

A pipeline calls its denoiser in its own way (positional or keyword latents, a timestep
per sample or one for all, `return_dict=False` for a tuple or the default `*Output`
dataclass). qdiff learns from the call as it was made: the inputs are kept as passed,
the timestep is read by name or position from the denoiser's signature, and the answer
is the return value's first field (the raw prediction, e.g. noise and learned variance
together for DiT), which `with_prediction` can put back into the form the pipeline expects.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class DenoiserCall:
    """One call of a pipeline's denoiser component.

    `args`/`kwargs` are the call's inputs (tensors detached copies, so the pipeline's later
    in-place updates cannot change them); calling the denoiser with them asks the same
    question again. `output` is the teacher's raw prediction for them.
    """

    component: str  # "unet", "transformer" or "transformer_2"
    index: int  # position among all denoiser calls of this pipeline call, from 0
    args: tuple
    kwargs: dict
    timestep: Optional[torch.Tensor]  # the call's `timestep` argument as passed
    output: torch.Tensor

    def ask(self, denoiser: nn.Module) -> Any:
        """`denoiser`'s return value for this call's inputs."""
        return denoiser(*self.args, **self.kwargs)


def detached(value: Any) -> Any:
    """`value` with every tensor inside (tuples, lists, dicts) a detached copy."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(detached(item) for item in value)
    if isinstance(value, dict):
        return {key: detached(item) for key, item in value.items()}
    return value


def _timestep_slot(denoiser: nn.Module) -> Optional[int]:
    """The position of `timestep` in the class's `forward` (an instance's may be a hook's
    wrapper taking *args, as accelerate's offloading installs)."""
    names = [name for name in inspect.signature(type(denoiser).forward).parameters
             if name != "self"]
    return names.index("timestep") if "timestep" in names else None


def timestep_of(denoiser: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The `timestep` argument of a call, by keyword or by its slot in `forward`'s signature."""
    if "timestep" in kwargs:
        return kwargs["timestep"]
    slot = _timestep_slot(denoiser)
    return args[slot] if slot is not None and slot < len(args) else None


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of a model's first float parameter (float32 for a model without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _cast(item, dtype) for key, item in value.items()}
    return value


def cast_inputs(denoiser: nn.Module, args: tuple, kwargs: dict, dtype: torch.dtype
                ) -> tuple[tuple, dict]:
    """A call's inputs for a model computing in `dtype` (a float32 student of a bf16
    teacher): float tensors cast, the timestep left as passed (bf16 would round it)."""
    slot = _timestep_slot(denoiser)
    args = tuple(arg if index == slot else _cast(arg, dtype) for index, arg in enumerate(args))
    kwargs = {key: value if key == "timestep" else _cast(value, dtype)
              for key, value in kwargs.items()}
    return args, kwargs


def prediction(result: Any) -> torch.Tensor:
    """The raw prediction in a denoiser's return value: a tensor, a tuple's first item, or
    a diffusers `*Output`'s first field (`sample`).

    Args:
        result: What the denoiser returned.

    Returns:
        The prediction tensor.

    Raises:
        TypeError: `result` is none of these forms.
    """
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, (BaseOutput, tuple, list)):
        return result[0]
    raise TypeError(f"Cannot find the prediction in a denoiser's {type(result).__name__}.")


def with_prediction(result: Any, output: torch.Tensor) -> Any:
    """`result` in the same form, its prediction replaced by `output`.

    Args:
        result: What the denoiser returned.
        output: The prediction to put in its place.

    Returns:
        A tensor, tuple or `*Output` like `result`, holding `output`.

    Raises:
        TypeError: `result` is not a tensor, a tuple or a diffusers `*Output`.
    """
    if isinstance(result, torch.Tensor):
        return output
    if isinstance(result, BaseOutput):
        first = dataclasses.fields(result)[0].name
        return dataclasses.replace(result, **{first: output})
    if isinstance(result, (tuple, list)):
        return type(result)([output, *result[1:]])
    raise TypeError(f"Cannot put a prediction into a denoiser's {type(result).__name__}.")


def call_dtype(args: tuple, kwargs: dict) -> Optional[torch.dtype]:
    """The dtype a call is made in: its first float tensor argument's (the latents)."""
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.dtype
    return None


def ask_in_own_dtype(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """`model`'s return value for a call made in another dtype: a bf16 teacher among float32
    text encoders and latents (`model.dtype` casts only the denoisers) gets its inputs in
    bf16 and answers in the call's dtype, as the pipeline expects. A call already in the
    model's dtype goes through untouched."""
    called = call_dtype(args, kwargs)
    own = compute_dtype(model)
    if called is None or called == own:
        return model(*args, **kwargs)
    own_args, own_kwargs = cast_inputs(model, args, kwargs, own)
    result = model(*own_args, **own_kwargs)
    return with_prediction(result, prediction(result).to(called))
