"""The teacher's own sampling trajectory: the only data data-free distillation sees.

The full-precision teacher starts from noise and walks its sampler (DDIM, `eta` from the
config) with classifier-free guidance. At every step it yields what the student needs to
be asked the same question: the denoiser input x_t, the timestep, the conditioning, and
the teacher's guided noise prediction (the answer to match). What is family-specific
(context, latents, the denoiser call) comes from the pipeline's family adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from qdiff.families import FamilyAdapter, family_for


@dataclass
class TrajectoryStep:
    index: int  # position along the trajectory, 0 = pure noise
    timestep: torch.Tensor  # scalar: the denoiser's `timestep` argument
    model_input: torch.Tensor  # x_t as the denoiser sees it
    context: torch.Tensor  # the family's context (conditional then null half when guided)
    teacher_output: torch.Tensor  # the teacher's guidance-combined noise prediction
    update_scale: float  # d x_prev / d eps of the deterministic DDIM step from here
    x0_scale: float  # d x0 / d eps: how much an error here moves the predicted image


def trajectory_timesteps(pipe, steps: int) -> torch.Tensor:
    """The timesteps a `steps`-step walk of the pipeline's (or adapter's) scheduler visits."""
    return family_for(pipe).trajectory_scheduler(steps).timesteps


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


def x0_scale(scheduler: DDIMScheduler, timestep: int) -> float:
    """How much an error in the noise prediction at `timestep` moves the predicted image.

    x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), so d x0 / d eps = sqrt((1 - a_t) / a_t):
    about 13 at the noisiest DDIM step of the digits teacher, 0.03 at the last. An error
    early on decides the layout of the image, which every later step builds on.
    """
    a_t = float(scheduler.alphas_cumprod[timestep])
    return ((1 - a_t) / a_t) ** 0.5


class TrajectoryWalk:
    """A batch of sampling trajectories from noise, walked one DDIM step at a time.

    `point()` is the question at the current step, with the teacher's answer; `advance`
    takes the step with the noise prediction of whoever walks: the teacher (the student
    learns on the teacher's path) or the student (it learns on the path it will take
    when it samples, so it learns to correct its own drift).
    `generator` may be one per sample: each sample's noise then does not depend on which
    other samples share its batch (or process). The scheduler is a copy, so the
    pipeline's own scheduler state is left untouched.
    """

    def __init__(self, pipe: Union[FamilyAdapter, DiffusionPipeline], conditions: torch.Tensor,
                 steps: int, eta: float, guidance: float,
                 generator: Union[torch.Generator, list[torch.Generator]]) -> None:
        self.family = family_for(pipe)
        self.scheduler = self.family.trajectory_scheduler(steps)
        self.eta, self.guidance, self.generator = eta, guidance, generator
        with torch.no_grad():  # the teacher's condition encoder takes no gradients
            self.context = self.family.context(conditions, guidance)
            self.latents = self.family.prepare_latents(len(conditions), generator)
        self.index = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.scheduler.timesteps)

    @torch.no_grad()
    def point(self) -> TrajectoryStep:
        timestep = self.scheduler.timesteps[self.index]
        model_input = self.scheduler.scale_model_input(self.latents, timestep)
        noise = self.family.guided_noise(model_input, timestep, self.context, self.guidance)
        return TrajectoryStep(self.index, timestep, model_input, self.context, noise,
                              ddim_update_scale(self.scheduler, int(timestep)),
                              x0_scale(self.scheduler, int(timestep)))

    @torch.no_grad()
    def advance(self, noise: torch.Tensor) -> None:
        timestep = self.scheduler.timesteps[self.index]
        self.latents = self.scheduler.step(noise.detach(), timestep, self.latents, eta=self.eta,
                                           generator=self.generator).prev_sample
        self.index += 1


def teacher_trajectory(pipe: Union[FamilyAdapter, DiffusionPipeline], conditions: torch.Tensor,
                       steps: int, eta: float, guidance: float,
                       generator: Union[torch.Generator, list[torch.Generator]]
                       ) -> Iterator[TrajectoryStep]:
    """Walk the teacher from noise; yield one TrajectoryStep per denoising step.

    `pipe` is a pipeline or its family adapter; `conditions` are the family's condition
    ids (class ids, prompt indices).
    """
    walk = TrajectoryWalk(pipe, conditions, steps, eta, guidance, generator)
    while not walk.done:
        point = walk.point()
        yield point
        walk.advance(point.teacher_output)
