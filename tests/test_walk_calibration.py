"""Calibration observes the stock pipeline's denoiser calls, and a calibrated quantized
student learns in the student walker."""

from __future__ import annotations

import copy

import pytest
import torch

from qdiff.calibrate import calibrate
from qdiff.config import QuantConfig
from qdiff.eval.sampling import balanced_labels
from qdiff.quant import TemporalActQuantizer, quantize_
from qdiff.walk import calibrate_on_calls, walk_with_student
from walk_cases import CASES, random_class_ldm

pytestmark = pytest.mark.usefixtures("one_thread")


def _quantized(model: torch.nn.Module) -> torch.nn.Module:
    student = copy.deepcopy(model).float()
    quantize_(student, QuantConfig(weight_bits=4, act_bits=8))
    return student


def test_calibrating_on_the_pipelines_calls_sets_the_scales_calibrate_sets():
    """The class LDM's pipeline walks the DDIM that `qdiff.calibrate` walks through the
    family adapter: the same trajectories give the same activation tables."""
    pipe = random_class_ldm()
    pipe.set_progress_bar_config(disable=True)
    by_adapter = _quantized(pipe.unet)
    by_pipeline = copy.deepcopy(by_adapter)

    calibrate(by_adapter, pipe, num_samples=4, steps=3, eta=0.0, guidance=2.0, batch_size=4, seed=0)
    calibrate_on_calls(pipe, {"unet": by_pipeline}, [dict(
        class_labels=balanced_labels(4, 10), guidance_scale=2.0, num_inference_steps=3, eta=0.0,
        generator=torch.Generator().manual_seed(0), output_type="pt")])

    expected, actual = by_adapter.state_dict(), by_pipeline.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    tables = [m.timesteps for m in by_pipeline.modules() if isinstance(m, TemporalActQuantizer)]
    assert tables and all(torch.equal(t, pipe.scheduler.timesteps.float().sort().values)
                          for t in tables)


def test_a_calibrated_quantized_student_learns_in_the_student_walker():
    """Wan 2.1 with UniPC on flow sigmas, as it ships: W4A8, calibrated on the pipeline's calls,
    then an Adam step at every call of the student's own walks."""
    walk = CASES["wan/unipc-flow"]
    pipe = walk.pipe()
    student = _quantized(getattr(pipe, walk.denoiser))
    calibrate_on_calls(pipe, {walk.denoiser: student}, [walk.call_kwargs(seeds=(1, 2))])
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=3e-4)
    losses: list[list[float]] = []

    def learn(call, student_output, teacher_output):
        loss = torch.nn.functional.mse_loss(student_output.float(), teacher_output.float())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses[-1].append(loss.item())

    for _ in range(5):
        losses.append([])
        walk_with_student(pipe, {walk.denoiser: student}, walk.call_kwargs(), learn)
    per_walk = [sum(walk_losses) / len(walk_losses) for walk_losses in losses]
    assert per_walk[-1] < 0.7 * per_walk[0], per_walk
