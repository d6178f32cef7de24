"""PTQ initialisation of every activation scale from the teacher's own sampling trajectories.

Weight scales are initialised when `quantize_` wraps a layer (they only need the weight).
Activation ranges change along the trajectory, so they are observed where they occur:
the teacher walks its sampler, and at each step the student, in calibration mode, sees
the same (x_t, t, condition). Each temporal quantizer records its input per timestep
value; leaving the `calibrating` block runs the Lp search for every entry.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

from qdiff.distill.trajectory import teacher_trajectory, trajectory_timesteps
from qdiff.eval.sampling import balanced_labels
from qdiff.families import family_for
from qdiff.quant import calibrating, set_timesteps

logger = logging.getLogger("qdiff.calibrate")


@torch.no_grad()
def calibrate(student: nn.Module, pipe, num_samples: int, steps: int, eta: float,
              guidance: float, batch_size: int = 16, seed: int = 0) -> None:
    """Set the student's activation scales from `num_samples` teacher trajectories.

    The timestep table of every temporal quantizer becomes the `steps`-step schedule;
    sampling later with fewer steps uses the nearest entries. `pipe` is a pipeline or
    its family adapter; the trajectories cover its conditions evenly.
    """
    family = family_for(pipe)
    set_timesteps(student, trajectory_timesteps(family, steps))
    labels = balanced_labels(num_samples, family.num_conditions)
    generator = torch.Generator().manual_seed(seed)
    starts = range(0, num_samples, batch_size)
    with calibrating(student):
        for start in tqdm(starts, desc=f"calibrating on {num_samples} trajectories", unit="batch"):
            batch = labels[start:start + batch_size]
            for step in teacher_trajectory(family, batch, steps, eta, guidance, generator):
                family.guided_noise(step.model_input, step.timestep, step.context, guidance,
                                    denoiser=student)
    logger.info("calibrated %d-step activation tables on %d trajectories", steps, num_samples)
