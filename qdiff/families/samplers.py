"""The first-order samplers that trajectories walk, and how an output error moves them.

Distillation needs three things of a sampler at each timestep: the step itself (the
walker takes it with the teacher's or the student's prediction), `update_scale`, how far
an error in the prediction moves the next latent, and `x0_scale`, how far it moves the
clean sample the prediction implies (the weight of the x0 loss). Both depend on what the
denoiser predicts:

- DDIM over a noise schedule alphas_cumprod (`DDIMSampler`), for noise (epsilon) or v
  predictions (`prediction_type`): the image families, and CogVideoX (v);
- Euler over a flow-matching schedule of sigmas (`FlowMatchSampler`), for the velocity
  v = noise - x0 that Wan predicts: x_t = (1 - sigma) x0 + sigma noise.

Each step is a function of the current latent alone (no multistep history), so a
trajectory can be walked by the teacher or by the student, and replayed when resuming.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Union

import torch
from diffusers import DDIMScheduler, SchedulerMixin

from qdiff.config import ConfigError

Generator = Union[torch.Generator, list[torch.Generator], None]


def _alphas(scheduler: DDIMScheduler, timestep: int) -> tuple[float, float]:
    """alphas_cumprod at `timestep` and at the timestep DDIM steps to from there."""
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod
    a_prev = float(alphas[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    return float(alphas[timestep]), a_prev


def _prediction_type(scheduler: DDIMScheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"Distillation supports epsilon and v_prediction DDIM schedules, not "
                         f"prediction_type='{kind}'.")
    return kind


def ddim_update_scale(scheduler: DDIMScheduler, timestep: int) -> float:
    """How much an error in the prediction at `timestep` moves the next latent (eta 0).

    DDIM: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps. For a noise prediction,
    x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), so d x_prev / d eps
    = sqrt(1 - a_prev) - sqrt(a_prev (1 - a_t) / a_t); near t = 0 it is small, where the
    noise prediction barely changes the image. For v = sqrt(a_t) eps - sqrt(1 - a_t) x0,
    d x_prev / d v = sqrt((1 - a_prev) a_t) - sqrt(a_prev (1 - a_t)).
    """
    a_t, a_prev = _alphas(scheduler, timestep)
    if _prediction_type(scheduler) == "epsilon":
        return (1 - a_prev) ** 0.5 - (a_prev * (1 - a_t) / a_t) ** 0.5
    return ((1 - a_prev) * a_t) ** 0.5 - (a_prev * (1 - a_t)) ** 0.5


def ddim_x0_scale(scheduler: DDIMScheduler, timestep: int) -> float:
    """How much an error in the prediction at `timestep` moves the predicted clean sample.

    Noise: d x0 / d eps = sqrt((1 - a_t) / a_t), about 13 at the noisiest DDIM step of the
    digits teacher and 0.03 at the last: an early error decides the layout of the image,
    which every later step builds on. v: x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v, so
    d x0 / d v = sqrt(1 - a_t), which stays finite at zero terminal SNR (CogVideoX).
    """
    a_t = float(scheduler.alphas_cumprod[timestep])
    if _prediction_type(scheduler) == "epsilon":
        return ((1 - a_t) / a_t) ** 0.5
    return (1 - a_t) ** 0.5


class TrajectorySampler(ABC):
    """A fresh walk of `timesteps` (noisiest first); the scheduler is the walk's own copy."""

    timesteps: torch.Tensor

    def model_input(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """x_t as the denoiser sees it."""
        return latents

    @abstractmethod
    def step(self, output: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor,
             eta: float, generator: Generator) -> torch.Tensor:
        """The next latent, from the (guided) prediction `output` at `timestep`."""

    @abstractmethod
    def update_scale(self, timestep: torch.Tensor) -> float:
        """d (next latent) / d output at `timestep`."""

    @abstractmethod
    def x0_scale(self, timestep: torch.Tensor) -> float:
        """d (implied clean sample) / d output at `timestep`."""


class DDIMSampler(TrajectorySampler):
    """DDIM (eta from the config) on a DDIMScheduler already set to its number of steps."""

    def __init__(self, scheduler: DDIMScheduler) -> None:
        self.scheduler = scheduler
        self.timesteps = scheduler.timesteps

    def model_input(self, latents, timestep):
        return self.scheduler.scale_model_input(latents, timestep)

    def step(self, output, timestep, latents, eta, generator):
        return self.scheduler.step(output, timestep, latents, eta=eta,
                                   generator=generator).prev_sample

    def update_scale(self, timestep):
        return ddim_update_scale(self.scheduler, int(timestep))

    def x0_scale(self, timestep):
        return ddim_x0_scale(self.scheduler, int(timestep))


class FlowMatchSampler(TrajectorySampler):
    """Euler steps x_next = x_t + (sigma_next - sigma) v on a flow scheduler's sigma grid.

    The grid is the scheduler's own after `set_timesteps` (FlowMatchEulerDiscreteScheduler,
    or UniPCMultistepScheduler with use_flow_sigmas as Wan ships it): the trajectory visits
    the timesteps the pipeline samples at, and the step equals FlowMatchEuler's.
    """

    def __init__(self, scheduler: SchedulerMixin) -> None:
        self.timesteps = scheduler.timesteps
        self.sigmas = scheduler.sigmas  # one more than timesteps: the last is 0

    @classmethod
    def walk_of(cls, scheduler: SchedulerMixin, steps: int) -> "FlowMatchSampler":
        """A `steps`-step walk on a fresh copy of `scheduler` (its state stays untouched)."""
        fresh = type(scheduler).from_config(scheduler.config)
        fresh.set_timesteps(steps)
        return cls(fresh)

    def _index(self, timestep: torch.Tensor) -> int:
        matches = (self.timesteps == timestep.to(self.timesteps.device)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(timestep)} is not on this walk's grid "
                             f"{self.timesteps.tolist()}.")
        return int(matches[0])

    def step(self, output, timestep, latents, eta, generator):
        if eta > 0:
            raise ConfigError(f"distill.eta={eta}: flow-matching trajectories are deterministic "
                              f"Euler walks; set distill.eta=0.")
        index = self._index(timestep)
        step = (self.sigmas[index + 1] - self.sigmas[index]).to(latents.device)
        return latents.float() + step * output.float()

    def update_scale(self, timestep):
        index = self._index(timestep)
        return float(self.sigmas[index + 1] - self.sigmas[index])

    def x0_scale(self, timestep):
        return float(self.sigmas[self._index(timestep)])  # x0 = x_t - sigma v
