"""How far an error in a denoiser's raw output moves the clean sample it implies.

The weight of an x0 loss at one call, read from the pipeline's configured scheduler
rather than from a family: d x0 / d output at the call's timestep.

- Flow matching (FlowMatchEulerDiscreteScheduler; UniPC, DPM-Solver with
  `use_flow_sigmas`; `prediction_type="flow_prediction"`): x_t = (1 - sigma) x0 +
  sigma noise and the model predicts v = noise - x0, so x0 = x_t - sigma v: the scale is
  the sigma the scheduler pairs with that timestep.
- Noise schedules with `alphas_cumprod` (DDPM, DDIM, PNDM, Euler, UniPC, DPM-Solver, ...),
  x_t = sqrt(a) x0 + sqrt(1 - a) eps, by `prediction_type`: epsilon sqrt((1 - a) / a),
  v_prediction sqrt(1 - a), sample 1.
"""

from __future__ import annotations

from typing import Union

import torch
from diffusers import SchedulerMixin

TimestepLike = Union[int, float, torch.Tensor]


def is_flow_matching(scheduler: SchedulerMixin) -> bool:
    """Whether the scheduler's model predicts a flow-matching velocity on a sigma grid.

    Args:
        scheduler: The pipeline's scheduler.

    Returns:
        True for flow-matching schedulers.
    """
    config = scheduler.config
    return (bool(config.get("use_flow_sigmas", False))
            or config.get("prediction_type") == "flow_prediction"
            or not hasattr(scheduler, "alphas_cumprod"))


def single_timestep(timestep: TimestepLike) -> float:
    """The one timestep of a call: a scalar, or equal entries per sample. Per-token
    timesteps (B, L) count by each sample's noisiest token."""
    t = torch.as_tensor(timestep).detach().float()
    if t.dim() == 2:
        t = t.amax(dim=1)
    t = t.reshape(-1)
    if len(t) == 0 or bool((t != t[0]).any()):
        raise ValueError(f"Expected one timestep for the whole batch, got {t.tolist()}.")
    return float(t[0])


def grids_as_called(scheduler: SchedulerMixin, timestep: TimestepLike
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's current grid as pipelines pass it to their denoiser: as it is (Wan,
    SD3), and as FLUX.1, FLUX.2 and Qwen-Image pass it, divided by num_train_timesteps in the
    dtype of the call's `timestep` (float32 for an integer one)."""
    dtype = torch.as_tensor(timestep).dtype
    grid = scheduler.timesteps.detach().cpu()
    divided = grid.to(dtype if dtype.is_floating_point else torch.float32)
    divided = (divided / scheduler.config.get("num_train_timesteps", 1000)).float()
    return grid, divided


def flow_sigma(scheduler: SchedulerMixin, timestep: TimestepLike) -> float:
    """The sigma the scheduler's current grid pairs with `timestep` (after `set_timesteps`):
    the timestep is looked for on the grid, then on it divided (`grids_as_called`)."""
    t = single_timestep(timestep)
    grid, divided = grids_as_called(scheduler, timestep)
    for timesteps in (grid.float(), divided):
        matches = (timesteps == t).nonzero()
        if len(matches):
            return float(scheduler.sigmas[int(matches[0])])
    raise ValueError(f"timestep {t} is not on the scheduler's grid {grid.float().tolist()} (nor "
                     f"on it divided by num_train_timesteps); call set_timesteps as the "
                     f"pipeline did.")


def x0_scale(scheduler: SchedulerMixin, timestep: TimestepLike) -> float:
    """d x0 / d (raw denoiser output) at `timestep` under the scheduler's parameterisation.

    Args:
        scheduler: The pipeline's scheduler.
        timestep: The call's timestep (one for the whole batch).

    Returns:
        The scale to weight the loss on the raw output by, so that it measures x0's error.

    Raises:
        ValueError: The batch has several timesteps, the timestep is not on the scheduler's
            grid, or the scheduler's `prediction_type` has no x0 weighting.
    """
    if is_flow_matching(scheduler):
        return flow_sigma(scheduler, timestep)
    a_t = float(scheduler.alphas_cumprod[int(round(single_timestep(timestep)))])
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return ((1 - a_t) / a_t) ** 0.5
    if kind == "v_prediction":
        return (1 - a_t) ** 0.5
    if kind == "sample":
        return 1.0
    raise ValueError(f"No x0 weighting for prediction_type={kind!r}.")
