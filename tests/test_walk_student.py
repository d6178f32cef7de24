"""The student walker: the student answers in the pipeline, learns at every call, and the
pipeline advances with its answers."""

from __future__ import annotations

import copy

import pytest
import torch

from qdiff.walk import StopWalk, walk_with_student
from walk_cases import CASES

pytestmark = pytest.mark.usefixtures("one_thread")


def _output_tensor(output) -> torch.Tensor:
    return torch.as_tensor(output[0])


def _ignore(call, student_output, teacher_output) -> None:
    pass


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    student = copy.deepcopy(model).float().train()
    torch.manual_seed(1)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(scale * param.std().nan_to_num(0.0) * torch.randn_like(param))
    return student


@pytest.mark.parametrize("case", ["sd/unipc", "dit/ddim", "wan/flow-euler", "cogvideox/ddim-v",
                                  "sdxl/euler", "sd3.5/flow-euler", "flux.1-dev/flow-euler",
                                  "qwen-image/flow-euler", "wan2.2-ti2v/unipc-flow",
                                  "wan2.2-ti2v-i2v/unipc-flow", "wan2.2-i2v-a14b/unipc-flow",
                                  "flux.2-dev/flow-euler", "hunyuanvideo1.5/flow-euler",
                                  "ltx-2/flow-euler"])
def test_an_exact_copy_of_the_teacher_walks_bit_identically_to_the_teacher(case):
    walk = CASES[case]
    pipe = walk.pipe()
    expected = _output_tensor(pipe(**walk.call_kwargs()))
    student = copy.deepcopy(getattr(pipe, walk.denoiser))
    output = walk_with_student(pipe, {walk.denoiser: student}, walk.call_kwargs(), _ignore)
    assert torch.equal(_output_tensor(output), expected)


def test_the_pipeline_advances_with_the_students_answers_unless_it_follows_the_teacher():
    walk = CASES["sd/ddim"]
    pipe = walk.pipe()
    expected = _output_tensor(pipe(**walk.call_kwargs()))
    student = _perturbed(pipe.unet, scale=0.5)
    on_student = walk_with_student(pipe, {"unet": student}, walk.call_kwargs(), _ignore)
    on_teacher = walk_with_student(pipe, {"unet": student}, walk.call_kwargs(), _ignore,
                                   follow="teacher")
    assert not torch.equal(_output_tensor(on_student), expected)
    assert torch.equal(_output_tensor(on_teacher), expected)


def test_the_student_learns_inside_the_pipelines_no_grad():
    """An SGD step at every call: the student's output carries gradients although the
    pipeline runs in no_grad, the teacher's does not, and the loss falls over pipeline calls."""
    walk = CASES["sd/ddim"]
    pipe = walk.pipe()
    student = _perturbed(pipe.unet)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)
    losses: list[list[float]] = []

    def learn(call, student_output, teacher_output):
        assert student_output.requires_grad and not teacher_output.requires_grad
        assert call.component == "unet" and call.timestep is not None
        loss = torch.nn.functional.mse_loss(student_output, teacher_output)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses[-1].append(loss.item())

    for _ in range(4):
        losses.append([])
        walk_with_student(pipe, {"unet": student}, walk.call_kwargs(), learn)
    per_walk = [sum(walk_losses) / len(walk_losses) for walk_losses in losses]
    assert all(len(walk_losses) == 3 for walk_losses in losses)
    assert per_walk == sorted(per_walk, reverse=True) and per_walk[-1] < 0.7 * per_walk[0], per_walk
    assert pipe.unet is not student


def test_a_student_for_a_component_the_pipeline_lacks_is_refused():
    walk = CASES["sd/ddim"]
    pipe = walk.pipe()
    with pytest.raises(ValueError, match="transformer"):
        walk_with_student(pipe, {"transformer": pipe.unet}, walk.call_kwargs(), _ignore)


def test_with_two_experts_each_student_answers_its_own_calls():
    """Wan 2.2's layout: a student for the high-noise expert only learns at its calls (the
    first step, per branch); the low-noise expert answers its own."""
    walk = CASES["wan2.2-two-experts/flow-euler"]
    pipe = walk.pipe()
    expected = _output_tensor(pipe(**walk.call_kwargs()))
    seen: list[tuple[str, int]] = []

    def note(call, student_output, teacher_output):
        seen.append((call.component, call.index))
        assert torch.equal(student_output, teacher_output)

    student = copy.deepcopy(pipe.transformer)
    output = walk_with_student(pipe, {"transformer": student}, walk.call_kwargs(), note)
    assert torch.equal(_output_tensor(output), expected)
    assert seen == [("transformer", 0), ("transformer", 1)]


@pytest.mark.parametrize("whole_pipeline", [False, True], ids=["denoiser-bf16", "pipeline-bf16"])
def test_a_float32_student_learns_from_a_bfloat16_teacher(whole_pipeline):
    """A bf16 denoiser among float32 components (what `model.dtype` casts) is asked in bf16
    and answers in the pipeline's float32; a pipeline cast to bf16 as a whole goes on in
    bf16. Either way the student is asked in float32, the timestep as passed."""
    walk = CASES["wan/flow-euler"]
    pipe = walk.pipe()
    (pipe if whole_pipeline else pipe.transformer).to(torch.bfloat16)
    student = copy.deepcopy(pipe.transformer).float()
    dtypes = []

    def note(call, student_output, teacher_output):
        dtypes.append((student_output.dtype, teacher_output.dtype, call.timestep.dtype))
        assert torch.allclose(student_output, teacher_output.float(), atol=0.1)

    output = walk_with_student(pipe, {"transformer": student}, walk.call_kwargs(), note)
    working = torch.bfloat16 if whole_pipeline else torch.float32
    assert dtypes == [(torch.float32, working, torch.float32)] * 6
    assert torch.isfinite(_output_tensor(output)).all()


def test_on_call_can_stop_the_walk():
    walk = CASES["sd/ddim"]
    pipe = walk.pipe()
    unet, seen = pipe.unet, []

    def stop_at_the_second_call(call, student_output, teacher_output):
        seen.append(call.index)
        if call.index == 1:
            raise StopWalk

    assert walk_with_student(pipe, {"unet": copy.deepcopy(unet)}, walk.call_kwargs(),
                             stop_at_the_second_call) is None
    assert seen == [0, 1] and pipe.unet is unet


def test_the_path_can_be_chosen_per_call():
    """A resumed run replays its first calls on the teacher's path: following the teacher at
    every call samples what the teacher samples, whatever the student answers."""
    walk = CASES["sd/ddim"]
    pipe = walk.pipe()
    expected = _output_tensor(pipe(**walk.call_kwargs()))
    student = _perturbed(pipe.unet, scale=0.5)
    output = walk_with_student(pipe, {"unet": student}, walk.call_kwargs(), _ignore,
                               follow=lambda call: "teacher")
    assert torch.equal(_output_tensor(output), expected)
    mixed = walk_with_student(pipe, {"unet": student}, walk.call_kwargs(), _ignore,
                              follow=lambda call: "teacher" if call.index < 2 else "student")
    assert not torch.equal(_output_tensor(mixed), expected)
    with pytest.raises(ValueError, match="follow"):
        walk_with_student(pipe, {"unet": student}, walk.call_kwargs(), _ignore,
                          follow=lambda call: "both")
