"""The listening seam: a stand-in in place of each denoiser of a diffusers pipeline.

The stock pipeline walks (its own `__call__`, scheduler, guidance and latents); qdiff
only sits where the pipeline calls its denoiser. `DenoiserTap` puts a `DenoiserProxy`
in place of each denoiser component (`unet`, `transformer`, `transformer_2`, whichever
the pipeline has) and hands every call to a handler, which answers in the pipeline's
place: the teacher itself (recording), or a student (the pipeline then advances with
the student's answer).

The proxy holds the real model as its submodule `model` and forwards every attribute it
does not have to it, so what pipelines read of their denoiser -- `config`, `dtype`,
`device`, `cache_context`, `_reset_stateful_cache` -- is the real model's, and
`pipe.device` and `pipe._execution_device` (which looks for accelerate's `_hf_hook`)
answer as for the real model. Accelerate's hooks are per module: the real model keeps
its own, and those diffusers' model CPU offload puts on the proxy at the end of
`__call__` (`maybe_free_model_hooks`) go with it when the tap puts the original
components back (and hooks them again) -- also after an error.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from diffusers import DiffusionPipeline
from torch import nn

DENOISER_COMPONENTS = ("unet", "transformer", "transformer_2")

# (component name, index of the call among all denoiser calls, args, kwargs) -> return value
CallHandler = Callable[[str, int, tuple, dict], Any]


def working_dtype(pipe: DiffusionPipeline) -> Optional[torch.dtype]:
    """The dtype of the pipeline's other model components (autoencoder first), if any."""
    names = ["vae", *sorted(pipe.components)]
    for name in names:
        module = pipe.components.get(name)
        if name in DENOISER_COMPONENTS or not isinstance(module, nn.Module):
            continue
        for parameter in module.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    return None


def denoiser_components(pipe: DiffusionPipeline) -> list[str]:
    """The names of the pipeline's denoiser components that are set (not None).

    Args:
        pipe: The pipeline.

    Returns:
        The component names, in `DENOISER_COMPONENTS` order.
    """
    return [name for name in DENOISER_COMPONENTS
            if isinstance(getattr(pipe, name, None), nn.Module)]


class DenoiserProxy(nn.Module):
    """Stands in for the denoiser `model`: calls go to `answer`, attribute reads to `model`.

    Args:
        component: The component name, passed on to `answer`.
        model: The real denoiser.
        answer: Called as `answer(component, args, kwargs)` for every call.
        working_dtype: The dtype the proxy reports, when it differs from the model's.
    """

    def __init__(self, component: str, model: nn.Module,
                 answer: Callable[[str, tuple, dict], Any],
                 working_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.model = model
        self.component = component
        self.answer = answer
        self.working_dtype = working_dtype

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the pipeline works in around its denoiser: a bf16 teacher among float32
        components (`model.dtype` casts only the denoisers) reads as float32, so latents and
        decoding stay float32; the handlers ask the teacher in its own dtype."""
        return self.working_dtype or self.model.dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.answer(self.component, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name == "_old_forward":  # accelerate's: the proxy's own forward
                raise
            return getattr(model, name)

    def __delattr__(self, name: str) -> None:
        """Deleting a hook attribute read through from the model leaves it to the model:
        accelerate's `remove_hook_from_module(proxy, recurse=True)` removes it there."""
        if name == "_hf_hook" and name not in self.__dict__:
            return
        super().__delattr__(name)


class DenoiserTap:
    """Context manager: while inside, every denoiser call of `pipe` goes to `handler`.

    `handler(component, call_index, args, kwargs)` returns what the pipeline receives;
    `original(component)` is the real model, for handlers that ask it. `calls` counts
    the denoiser calls so far (over all components).

    Args:
        pipe: The pipeline whose denoiser calls to divert.
        handler: Called as `handler(component, call_index, args, kwargs)` for every call.
        components: The components to tap; None taps every denoiser component that is set.

    Raises:
        ValueError: `pipe` has none of the components asked for.
    """

    def __init__(self, pipe: DiffusionPipeline, handler: CallHandler,
                 components: Optional[Sequence[str]] = None) -> None:
        self.pipe = pipe
        self.handler = handler
        self.component_names = list(components or denoiser_components(pipe))
        if not self.component_names:
            raise ValueError(f"{type(pipe).__name__} has none of the denoiser components "
                             f"{DENOISER_COMPONENTS}.")
        self.originals: dict[str, nn.Module] = {}
        self._config_entries: dict[str, Any] = {}
        self.calls = 0

    def original(self, component: str) -> nn.Module:
        return self.originals[component]

    def _answer(self, component: str, args: tuple, kwargs: dict) -> Any:
        index, self.calls = self.calls, self.calls + 1
        return self.handler(component, index, args, kwargs)

    def __enter__(self) -> "DenoiserTap":
        dtype = working_dtype(self.pipe)
        try:
            for name in self.component_names:
                model = getattr(self.pipe, name)
                if isinstance(model, DenoiserProxy):
                    raise RuntimeError(f"pipe.{name} is already tapped.")
                self.originals[name] = model
                self._config_entries[name] = self.pipe.config.get(name)
                setattr(self.pipe, name, DenoiserProxy(name, model, self._answer, dtype))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        """Put the original components (and their entries in the pipeline's config) back.

        A pipeline with model CPU offload re-hooks its components at the end of `__call__`
        (`maybe_free_model_hooks`), which hooked the proxies: hook the originals again.
        """
        for name, model in self.originals.items():
            setattr(self.pipe, name, model)
            if self._config_entries.get(name) is not None:
                self.pipe.register_to_config(**{name: self._config_entries[name]})
        self.originals.clear()
        if getattr(self.pipe, "_all_hooks", None):
            self.pipe.enable_model_cpu_offload(device=self.pipe._offload_device)
