"""The distillation loss of one denoiser call: the student's raw output against the teacher's.

Each call is matched as the pipeline made it, so classifier-free guidance's conditional
and null predictions are matched each (batched in one call, or one call per branch),
never their guided combination, which multiplies the error that differs between them by
the guidance scale.

"mse" / "l1": of the outputs themselves. Their error is largest near t = 0, where it
hardly changes the sample, and smallest at the noisy start, where it decides it -- so
"x0" weights each call by d x0 / d output under the pipeline's scheduler
(`qdiff.walk.x0_scale`): the MSE of the clean samples the two outputs imply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin

from qdiff.walk import x0_scale

LOSSES = ("x0", "mse", "l1")


def call_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, kind: str,
              scheduler: SchedulerMixin, timestep: torch.Tensor) -> torch.Tensor:
    """The `kind` loss of one call at `timestep`, in float32 whatever the teacher's dtype."""
    student_output, teacher_output = student_output.float(), teacher_output.float()
    if kind == "l1":
        return F.l1_loss(student_output, teacher_output)
    scale = x0_scale(scheduler, timestep) if kind == "x0" else 1.0
    return F.mse_loss(student_output * scale, teacher_output * scale)
