"""The student walker: the student answers in the denoiser's place and learns at each call.

At every denoiser call of `pipe(**call_kwargs)` the teacher (the pipeline's own
component) answers the same inputs without gradients, the student answers with them,
and `on_call` compares the two and updates the student -- under `torch.enable_grad()`,
since pipelines run their `__call__` in `no_grad`. The pipeline then advances with the
student's answer (detached, in the teacher's dtype; the student is asked in its own
dtype, so a float32 student learns from a bf16 teacher), so the student learns on the
path it takes when it samples; with `follow="teacher"` it advances with the teacher's, so
the student learns on the teacher's path without the calls being stored.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, Optional, Union

import torch
from diffusers import DiffusionPipeline
from torch import nn

from .call import (DenoiserCall, ask_in_own_dtype, call_dtype, cast_inputs, compute_dtype, detached,
                   prediction, timestep_of, with_prediction)
from .tap import DenoiserTap, denoiser_components

# (the call with the teacher's output, the student's prediction with grad, the teacher's)
OnCall = Callable[[DenoiserCall, torch.Tensor, torch.Tensor], None]
BeforeCall = Callable[[DenoiserCall], None]
Follow = Union[Literal["student", "teacher"], Callable[[DenoiserCall], str]]


class StopWalk(Exception):
    """Raised by `on_call` to end the walk there (e.g. the run's last step is done)."""


def walk_with_student(pipe: DiffusionPipeline, student_by_component: Mapping[str, nn.Module],
                      call_kwargs: Mapping[str, Any], on_call: OnCall,
                      follow: Follow = "student",
                      before_call: Optional[BeforeCall] = None) -> Optional[Any]:
    """Run `pipe(**call_kwargs)` with the students answering; return the pipeline's output,
    or None when `on_call` raised `StopWalk`.

    `follow` may also decide per call (`follow(call)` -> "student" or "teacher"): a resumed
    run replays the calls it already trained on along the teacher's path. A denoiser
    component without a student (e.g. Wan 2.2's `transformer_2` while only `transformer`
    is distilled) is answered by the teacher alone. Attribute reads of the pipeline
    (`config`, `dtype`, ...) still see the teacher. `before_call(call)` runs before the
    student answers (its `output` is the teacher's): a trainer takes the optimizer step of
    the previous denoising step there, so the student answers this call updated.

    Args:
        pipe: The teacher pipeline.
        student_by_component: `{component: student}`.
        call_kwargs: The arguments of `pipe(...)`.
        on_call: Called as `on_call(call, student_output, teacher_output)` at every call of a
            component with a student, with gradients enabled; it may raise `StopWalk`.
        follow: "student" (the pipeline continues from the students' answers), "teacher", or
            a function of the call that gives one of the two.
        before_call: Called with each call before its student answers.

    Returns:
        The pipeline's output, or None when the walk was stopped.

    Raises:
        ValueError: A key of `student_by_component` is not a denoiser component of `pipe`, or
            `follow` gives something other than "student" or "teacher".
    """
    unknown = set(student_by_component) - set(denoiser_components(pipe))
    if unknown:
        raise ValueError(f"{type(pipe).__name__} has no denoiser component {sorted(unknown)}; "
                         f"it has {denoiser_components(pipe)}.")

    def answer(component: str, index: int, args: tuple, kwargs: dict) -> Any:
        teacher = tap.original(component)
        with torch.no_grad():
            result = ask_in_own_dtype(teacher, args, kwargs)
        student = student_by_component.get(component)
        if student is None:
            return result
        teacher_output = prediction(result)
        call = DenoiserCall(component, index, detached(args), detached(kwargs),
                            detached(timestep_of(teacher, args, kwargs)), teacher_output)
        if before_call is not None:
            before_call(call)
        student_args, student_kwargs = cast_inputs(teacher, args, kwargs, compute_dtype(student))
        with torch.enable_grad():
            student_output = prediction(student(*student_args, **student_kwargs))
            on_call(call, student_output, teacher_output)
        path = follow(call) if callable(follow) else follow
        if path not in ("student", "teacher"):
            raise ValueError(f"follow must give 'student' or 'teacher', not {path!r}.")
        if path == "teacher":
            return result
        return with_prediction(result, student_output.detach().to(teacher_output.dtype))

    try:
        with DenoiserTap(pipe, answer) as tap:
            return pipe(**call_kwargs)
    except StopWalk:
        return None


@torch.no_grad()
def sample_with_students(pipe: DiffusionPipeline, student_by_component: Mapping[str, nn.Module],
                         call_kwargs: Mapping[str, Any]) -> Any:
    """`pipe(**call_kwargs)` with the students in their components' place (each asked in its
    own dtype, answering in the teacher's): what the pipeline samples with the students.

    Args:
        pipe: The teacher pipeline.
        student_by_component: `{component: student}`; other denoisers stay the teacher's.
        call_kwargs: The arguments of `pipe(...)`.

    Returns:
        The pipeline's output.
    """
    def answer(component: str, index: int, args: tuple, kwargs: dict) -> Any:
        teacher = tap.original(component)
        student = student_by_component.get(component)
        if student is None:
            return ask_in_own_dtype(teacher, args, kwargs)
        student_args, student_kwargs = cast_inputs(teacher, args, kwargs, compute_dtype(student))
        result = student(*student_args, **student_kwargs)
        output = prediction(result)
        return with_prediction(result, output.to(call_dtype(args, kwargs) or compute_dtype(teacher)))

    with DenoiserTap(pipe, answer) as tap:
        return pipe(**call_kwargs)
