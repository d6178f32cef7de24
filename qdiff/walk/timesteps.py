"""The timesteps a pipeline call will visit, read from the pipeline's own scheduler.

Pipelines set their scheduler's grid inside `__call__` (with their own arguments:
`sigmas`, `mu` for resolution-dependent shifts, `timesteps`), so the grid is read where
it is certain: at the first denoiser call, before the denoiser runs. Temporal quantizer
tables (`qdiff.quant.set_timesteps`) are sized from it.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from diffusers import DiffusionPipeline

from .tap import DenoiserTap


class _GridRead(Exception):
    """Ends the pipeline call once the scheduler's grid is known."""


def pipeline_timesteps(pipe: DiffusionPipeline, call_kwargs: Mapping[str, Any]) -> torch.Tensor:
    """`pipe.scheduler.timesteps` as `pipe(**call_kwargs)` sets them (no denoiser runs)."""
    def stop(component: str, index: int, args: tuple, kwargs: dict) -> Any:
        raise _GridRead

    try:
        with DenoiserTap(pipe, stop):
            pipe(**call_kwargs)
    except _GridRead:
        return pipe.scheduler.timesteps.detach().clone()
    raise RuntimeError(f"{type(pipe).__name__} returned without calling its denoiser.")


def use_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Give `pipe` the diffusers scheduler class `name`, built from its scheduler's config
    (nothing changes when it already has one of that class)."""
    import diffusers

    if type(pipe.scheduler).__name__ != name:
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
