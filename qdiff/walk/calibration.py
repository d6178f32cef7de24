"""Calibration observes the calls the student will learn from: the stock pipeline's.

The teacher walks (each `call_kwargs` is one `pipe(...)` call) and answers every denoiser
call; the students, in calibration mode, see the same inputs. Temporal activation
quantizers key what they observe by the `timestep` argument of the call (the timestep
context's pre-hook on the student's root reads it), so the tables come out on the
timesteps the pipeline's own scheduler visits -- per expert, for pipelines that switch
denoisers along the walk.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping

import torch
from diffusers import DiffusionPipeline
from torch import nn

from qdiff.quant import calibrating

from .call import ask_in_own_dtype, cast_inputs, compute_dtype
from .tap import DenoiserTap


@torch.no_grad()
def calibrate_on_calls(pipe: DiffusionPipeline, student_by_component: Mapping[str, nn.Module],
                       call_kwargs_batches: Iterable[Mapping[str, Any]]) -> None:
    """Set the students' activation scales from the teacher's walks of `call_kwargs_batches`.

    A student whose quantizers have a declared timestep table (`qdiff.quant.set_timesteps`)
    keeps it; otherwise the table is the timesteps its component was called at.

    Args:
        pipe: The teacher pipeline.
        student_by_component: `{component: student}`; components without a student are left out.
        call_kwargs_batches: The arguments of each `pipe(...)` call to walk.
    """
    def answer(component: str, index: int, args: tuple, kwargs: dict) -> Any:
        teacher = tap.original(component)
        result = ask_in_own_dtype(teacher, args, kwargs)
        student = student_by_component.get(component)
        if student is not None:
            student_args, student_kwargs = cast_inputs(teacher, args, kwargs, compute_dtype(student))
            student(*student_args, **student_kwargs)
        return result

    with contextlib.ExitStack() as stack:
        for student in student_by_component.values():
            stack.enter_context(calibrating(student))
        for call_kwargs in call_kwargs_batches:
            with DenoiserTap(pipe, answer) as tap:
                pipe(**call_kwargs)
