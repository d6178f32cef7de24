"""The teacher's own sampling trajectory: the only data data-free distillation sees.

The full-precision teacher starts from noise and walks its family's sampler (DDIM with
`eta` from the config, or Euler for flow matching) with classifier-free guidance. At every
step it yields what the student needs to be asked the same question: the denoiser input
x_t, the timestep, the conditioning, and the teacher's answers to match: its guided noise
prediction, and the conditional and null predictions that guidance combined
(`distill.target` picks which). What is family-specific (context, latents, the denoiser
call) comes from the pipeline's family adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Union

import torch
from diffusers import DiffusionPipeline

from qdiff.families import FamilyAdapter, combine_branches, family_for


@dataclass
class TrajectoryStep:
    index: int  # position along the trajectory, 0 = pure noise
    timestep: torch.Tensor  # scalar: the denoiser's `timestep` argument
    model_input: torch.Tensor  # x_t as the denoiser sees it
    context: torch.Tensor  # the family's context (conditional then null half when guided)
    teacher_output: torch.Tensor  # the teacher's guidance-combined noise prediction
    teacher_branches: torch.Tensor  # its conditional (then null) prediction before combining
    update_scale: float  # d x_next / d output of the deterministic step from here
    x0_scale: float  # d x0 / d output: how much an error here moves the implied clean sample


def trajectory_timesteps(pipe, steps: int) -> torch.Tensor:
    """The timesteps a `steps`-step walk of the pipeline's (or adapter's) sampler visits."""
    return family_for(pipe).trajectory_sampler(steps).timesteps


class TrajectoryWalk:
    """A batch of sampling trajectories from noise, walked one sampler step at a time.

    `point()` is the question at the current step, with the teacher's answer; `advance`
    takes the step with the noise prediction of whoever walks: the teacher (the student
    learns on the teacher's path) or the student (it learns on the path it will take
    when it samples, so it learns to correct its own drift).
    `generator` may be one per sample: each sample's noise then does not depend on which
    other samples share its batch (or process). The sampler holds its own scheduler, so
    the pipeline's scheduler state is left untouched.
    """

    def __init__(self, pipe: Union[FamilyAdapter, DiffusionPipeline], conditions: torch.Tensor,
                 steps: int, eta: float, guidance: float,
                 generator: Union[torch.Generator, list[torch.Generator]]) -> None:
        self.family = family_for(pipe)
        self.sampler = self.family.trajectory_sampler(steps)
        self.eta, self.guidance, self.generator = eta, guidance, generator
        with torch.no_grad():  # the teacher's condition encoder takes no gradients
            self.context = self.family.context(conditions, guidance)
            self.latents = self.family.prepare_latents(len(conditions), generator)
        self.index = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.sampler.timesteps)

    @torch.no_grad()
    def point(self) -> TrajectoryStep:
        timestep = self.sampler.timesteps[self.index]
        model_input = self.sampler.model_input(self.latents, timestep)
        branches = self.family.branch_noise(model_input, timestep, self.context, self.guidance)
        output = combine_branches(branches, self.guidance)
        return TrajectoryStep(self.index, timestep, model_input, self.context, output, branches,
                              self.sampler.update_scale(timestep), self.sampler.x0_scale(timestep))

    @torch.no_grad()
    def advance(self, noise: torch.Tensor) -> None:
        timestep = self.sampler.timesteps[self.index]
        self.latents = self.sampler.step(noise.detach(), timestep, self.latents, self.eta,
                                         self.generator)
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
