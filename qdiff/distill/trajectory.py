"""The teacher's own sampling trajectory: the only data data-free distillation sees.

The full-precision teacher starts from noise and walks its sampler (DDIM, `eta` from the
config) with classifier-free guidance. At every step it yields what the student needs to
be asked the same question: the denoiser input x_t, the timestep, the conditioning, and
the teacher's guided noise prediction (the answer to match).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

import torch
from diffusers import DDIMScheduler


@dataclass
class TrajectoryStep:
    index: int  # position along the trajectory, 0 = pure noise
    timestep: torch.Tensor  # scalar: the denoiser's `timestep` argument
    model_input: torch.Tensor  # x_t as the denoiser sees it
    context: torch.Tensor  # cross-attention context (conditional then null half when guided)
    teacher_output: torch.Tensor  # the teacher's guidance-combined noise prediction
    update_scale: float  # d x_prev / d eps of the deterministic DDIM step from here


def trajectory_timesteps(pipe, steps: int) -> torch.Tensor:
    """The timesteps a `steps`-step walk of the pipeline's scheduler visits."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def ddim_update_scale(scheduler: DDIMScheduler, timestep: int) -> float:
    """How much an error in the noise prediction at `timestep` moves the next latent.

    DDIM (eta 0): x_prev = sqrt(a_prev) (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    + sqrt(1 - a_prev) eps, so d x_prev / d eps = sqrt(1 - a_prev) - sqrt(a_prev (1 - a_t) / a_t).
    Near t = 0 it is small: there the noise prediction barely changes the image.
    """
    prev = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod
    a_t = float(alphas[timestep])
    a_prev = float(alphas[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    return (1 - a_prev) ** 0.5 - (a_prev * (1 - a_t) / a_t) ** 0.5


@torch.no_grad()
def teacher_trajectory(pipe, class_labels: torch.Tensor, steps: int, eta: float,
                       guidance: float, generator: Union[torch.Generator, list[torch.Generator]]
                       ) -> Iterator[TrajectoryStep]:
    """Walk the teacher pipeline from noise; yield one TrajectoryStep per denoising step.

    `generator` may be one per sample: each sample's noise then does not depend on which
    other samples share its batch (or process). The scheduler is a copy, so the
    pipeline's own scheduler state is left untouched.
    """
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    context = pipe.class_context(class_labels, guidance)
    latents = pipe.prepare_latents(len(class_labels), generator, None)
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, timestep)
        noise = pipe.guided_noise(model_input, timestep, context, guidance)
        yield TrajectoryStep(index, timestep, model_input, context, noise,
                             ddim_update_scale(scheduler, int(timestep)))
        latents = scheduler.step(noise, timestep, latents, eta=eta, generator=generator).prev_sample
