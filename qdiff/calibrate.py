"""PTQ initialisation of every activation scale from the teacher's own sampling trajectories.

Weight scales are initialised when `quantize_` wraps a layer (they only need the weight).
Activation ranges change along the trajectory, so they are observed where they occur:
the stock pipeline walks with the teacher (`qdiff.walk.calibrate_on_calls`), and at each
denoiser call the student of that component, in calibration mode, sees the same inputs.
Each temporal quantizer records its input per timestep value; leaving the `calibrating`
block runs the Lp search for every entry.
"""

from __future__ import annotations

import logging
from typing import Mapping, Union

import torch
from torch import nn
from tqdm import tqdm

from qdiff.config import ConfigError
from qdiff.eval.sampling import balanced_labels
from qdiff.families import Family, family_for
from qdiff.quant import set_timesteps
from qdiff.walk import calibrate_on_calls, denoiser_timesteps

logger = logging.getLogger("qdiff.calibrate")

Students = Union[nn.Module, Mapping[str, nn.Module]]


def by_component(students: Students, family: Family) -> dict[str, nn.Module]:
    """`{component: student}`: a mapping as it is; one model is the first denoiser's student,
    an `nn.ModuleDict` (what a run with several denoisers trains) its items.

    Args:
        students: One student, a `{component: student}` mapping, or an `nn.ModuleDict`.
        family: The family whose denoisers the students replace.

    Returns:
        `{component: student}`.
    """
    if isinstance(students, (nn.ModuleDict, Mapping)):
        return dict(students.items())
    return {family.denoisers[0]: students}


def trajectory_grid(family: Family, steps: int, guidance: float, eta: float = 0.0) -> torch.Tensor:
    """The timesteps a `steps`-step call of the family's pipeline visits, as its denoisers
    are called with them (the keys of the students' timestep tables).

    Args:
        family: The family whose pipeline is asked.
        steps: The number of sampling steps.
        guidance: The guidance scale of the call.
        eta: DDIM's eta, for schedulers that take it.

    Returns:
        The timesteps in the order the denoisers are called with them.

    Raises:
        ConfigError: The scheduler does not visit `steps` distinct timesteps (one denoiser
            call per step), so a timestep table could not key its steps.
    """
    probe = family.call_kwargs(torch.zeros(1, dtype=torch.long), torch.Generator().manual_seed(0),
                               steps, guidance, eta)
    grid = denoiser_timesteps(family.pipe, probe)
    if len(grid.unique()) != steps:
        raise ConfigError(f"{type(family.pipe.scheduler).__name__} visits {len(grid.unique())} "
                          f"timesteps in a {steps}-step call, but qdiff counts one denoising step "
                          f"per timestep; pick a scheduler with one model call per step "
                          f"(model.scheduler=UniPCMultistepScheduler, DDIMScheduler, ...).")
    return grid


@torch.no_grad()
def calibrate(students: Students, pipe, num_samples: int, steps: int, eta: float,
              guidance: float, batch_size: int = 16, seed: int = 0) -> None:
    """Set the students' activation scales from `num_samples` teacher trajectories.

    The timestep table of every temporal quantizer becomes the pipeline's `steps`-step grid
    (for every denoiser: an expert keeps the entries of the steps it serves, the others
    from their nearest); sampling later with fewer steps uses the nearest entries. `pipe`
    is a pipeline or its family; the trajectories cover its conditions evenly, their noise
    drawn from one generator seeded with `seed`.

    Args:
        students: One student, or `{component: student}` for a pipeline with several denoisers.
        pipe (DiffusionPipeline | Family): The teacher pipeline, or its family.
        num_samples: The number of teacher trajectories to record.
        steps: The number of sampling steps of each trajectory (the timestep table's grid).
        eta: DDIM's eta, for schedulers that take it.
        guidance: The guidance scale of the trajectories.
        batch_size: Trajectories per pipeline call.
        seed: The seed of the noise's generator.

    Raises:
        ConfigError: The scheduler's grid cannot key a timestep table (see `trajectory_grid`).
    """
    family = family_for(pipe)
    students = by_component(students, family)
    grid = trajectory_grid(family, steps, guidance, eta)
    for student in students.values():
        set_timesteps(student, grid)
    labels = balanced_labels(num_samples, family.num_conditions)
    generator = torch.Generator().manual_seed(seed)
    batches = (family.call_kwargs(labels[start:start + batch_size], generator, steps, guidance, eta)
               for start in range(0, num_samples, batch_size))
    total = -(-num_samples // batch_size)
    calibrate_on_calls(family.pipe, students,
                       tqdm(batches, total=total, unit="batch",
                            desc=f"calibrating on {num_samples} trajectories"))
    logger.info("calibrated %d-step activation tables on %d trajectories", steps, num_samples)
