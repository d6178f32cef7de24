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

from .call import timestep_of
from .tap import DenoiserTap
from .x0 import grids_as_called, single_timestep


class _FirstCall(Exception):
    """Ends the pipeline call at its first denoiser call (the scheduler's grid is set)."""

    def __init__(self, timestep: Any) -> None:
        self.timestep = timestep


def _first_call_timestep(pipe: DiffusionPipeline, call_kwargs: Mapping[str, Any]) -> Any:
    """Run `pipe(**call_kwargs)` up to its first denoiser call (no denoiser runs); that
    call's `timestep` argument."""
    def stop(component: str, index: int, args: tuple, kwargs: dict) -> Any:
        raise _FirstCall(timestep_of(tap.original(component), args, kwargs))

    try:
        with DenoiserTap(pipe, stop) as tap:
            pipe(**call_kwargs)
    except _FirstCall as first:
        return first.timestep
    raise RuntimeError(f"{type(pipe).__name__} returned without calling its denoiser.")


def pipeline_timesteps(pipe: DiffusionPipeline, call_kwargs: Mapping[str, Any]) -> torch.Tensor:
    """`pipe.scheduler.timesteps` as `pipe(**call_kwargs)` sets them (no denoiser runs).

    Args:
        pipe: The pipeline.
        call_kwargs: The arguments of the call.

    Returns:
        The scheduler's timesteps for that call.
    """
    _first_call_timestep(pipe, call_kwargs)
    return pipe.scheduler.timesteps.detach().clone()


def denoiser_timesteps(pipe: DiffusionPipeline, call_kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The grid of `pipe(**call_kwargs)` as its denoisers see it: the scheduler's timesteps,
    or, for pipelines that pass `timestep / num_train_timesteps` (FLUX, Qwen-Image), those
    divided as the first call shows (no denoiser runs). Timestep tables are keyed by it.

    Args:
        pipe: The pipeline.
        call_kwargs: The arguments of the call.

    Returns:
        The timesteps as the denoisers are called with them.

    Raises:
        ValueError: The first call's timestep is neither the scheduler's first timestep nor
            it divided by `num_train_timesteps`.
    """
    called = _first_call_timestep(pipe, call_kwargs)
    t = single_timestep(called)
    grid, divided = grids_as_called(pipe.scheduler, called)
    if float(grid[0]) == t:
        return grid.clone()
    if float(divided[0]) == t:
        return divided
    raise ValueError(f"{type(pipe).__name__} calls its denoiser at timestep {t}, which is neither "
                     f"the scheduler's first timestep {float(grid[0])} nor it divided by "
                     f"num_train_timesteps.")


def use_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Give `pipe` the diffusers scheduler class `name`, built from its scheduler's config
    (nothing changes when it already has one of that class).

    Args:
        pipe: The pipeline; its `scheduler` is replaced.
        name: A scheduler class of `diffusers`, for example "DDIMScheduler".

    Raises:
        AttributeError: `diffusers` has no class `name`.
    """
    import diffusers

    if type(pipe.scheduler).__name__ != name:
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
