"""Helpers for eval scripts on top of `qdiff.walk`: a student asked one recorded teacher
call, and a pipeline call where the students answer in chosen denoising steps only."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import nn

from qdiff.walk import DenoiserCall, DenoiserTap
from qdiff.walk.call import (
    cast_inputs,
    compute_dtype,
    detached,
    prediction,
    timestep_of,
    with_prediction,
)
from qdiff.walk.x0 import single_timestep


def student_answer(pipe: DiffusionPipeline, student: nn.Module, call: DenoiserCall) -> torch.Tensor:
    """`student`'s raw prediction for a recorded teacher call, asked in the student's own
    dtype (with gradients where they are enabled)."""
    teacher = getattr(pipe, call.component)
    args, kwargs = cast_inputs(teacher, call.args, call.kwargs, compute_dtype(student))
    return prediction(student(*args, **kwargs))


class _StepDone(Exception):
    pass


@torch.no_grad()
def first_step_calls(pipe: DiffusionPipeline, call_kwargs: Mapping[str, Any]) -> list[DenoiserCall]:
    """The teacher's denoiser calls of the first denoising step of `pipe(**call_kwargs)`
    (one call with both guidance branches batched, or one per branch); the pipeline call
    stops there."""
    calls: list[DenoiserCall] = []

    def answer(component: str, index: int, args: tuple, kwargs: dict) -> Any:
        teacher = tap.original(component)
        timestep = timestep_of(teacher, args, kwargs)
        if calls and single_timestep(timestep) != single_timestep(calls[0].timestep):
            raise _StepDone
        result = teacher(*args, **kwargs)
        calls.append(DenoiserCall(component, index, detached(args), detached(kwargs),
                                  detached(timestep), detached(prediction(result))))
        return result

    try:
        with DenoiserTap(pipe, answer) as tap:
            pipe(**call_kwargs)
    except _StepDone:
        pass
    return calls


def calls_by_step(calls: list[DenoiserCall]) -> list[list[DenoiserCall]]:
    """Recorded calls grouped into denoising steps (consecutive calls at one timestep)."""
    steps: list[list[DenoiserCall]] = []
    last = None
    for call in calls:
        timestep = single_timestep(call.timestep)
        if not steps or timestep != last:
            steps.append([])
        steps[-1].append(call)
        last = timestep
    return steps


@torch.no_grad()
def sample_with_students_in_steps(pipe: DiffusionPipeline,
                                  students: Mapping[str, nn.Module], call_kwargs: Mapping[str, Any],
                                  in_step: Callable[[int], bool]) -> Any:
    """`pipe(**call_kwargs)` where the students answer the calls of the denoising steps
    `in_step(index)` picks (steps counted from 0 by the call's timestep) and the teacher
    answers all others."""
    state = {"step": -1, "timestep": None}

    def answer(component: str, index: int, args: tuple, kwargs: dict) -> Any:
        teacher = tap.original(component)
        timestep = single_timestep(timestep_of(teacher, args, kwargs))
        if timestep != state["timestep"]:
            state["step"], state["timestep"] = state["step"] + 1, timestep
        student = students.get(component)
        if student is None or not in_step(state["step"]):
            return teacher(*args, **kwargs)
        student_args, student_kwargs = cast_inputs(teacher, args, kwargs, compute_dtype(student))
        result = student(*student_args, **student_kwargs)
        return with_prediction(result, prediction(result).to(compute_dtype(teacher)))

    with DenoiserTap(pipe, answer) as tap:
        return pipe(**call_kwargs)
