"""PTQ calibration through the stock pipeline, on the teacher's architecture (random weights):
the teacher's walk it observes, the timestep tables it fills, the ranges it finds."""

from __future__ import annotations

import copy

import pytest
import torch

from qdiff.calibrate import calibrate, trajectory_grid
from qdiff.config import QuantConfig
from qdiff.families import family_for
from qdiff.quant import TemporalActQuantizer, quantize_
from qdiff.walk import record_calls

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_walk_follows_ddim_in_closed_form_when_the_noise_prediction_is_zero(
        random_class_ldm_pipeline):
    # With eps = 0 and eta = 0, DDIM maps x_t to sqrt(abar_prev / abar_t) x_t, so every
    # x_t along the walk is the initial noise times sqrt(abar_t / abar_first).
    pipe = random_class_ldm_pipeline
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    family = family_for(pipe)
    kwargs = family.call_kwargs(torch.tensor([1, 2]), torch.Generator().manual_seed(0), 5, 3.0)
    _, calls = record_calls(pipe, kwargs)
    abar = pipe.scheduler.alphas_cumprod
    first = calls[0]
    # one call per step (both guidance branches batched), at the grid calibration keys by
    assert [int(c.timestep.reshape(-1)[0]) for c in calls] == \
        trajectory_grid(family, 5, 3.0).tolist()
    assert all(float(c.output.abs().max()) == 0.0 for c in calls)
    for call in calls[1:]:
        t, t_first = int(call.timestep.reshape(-1)[0]), int(first.timestep.reshape(-1)[0])
        ratio = (abar[t] / abar[t_first]).sqrt()
        torch.testing.assert_close(call.args[0], first.args[0] * ratio)


def test_the_recorded_walk_is_the_pipelines_own_sampling(random_class_ldm_pipeline):
    pipe = random_class_ldm_pipeline
    kwargs = family_for(pipe).call_kwargs(torch.tensor([4, 8]), torch.Generator().manual_seed(3),
                                          4, 2.0, output_type="pt")
    recorded = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: recorded.append(args[0].clone()))
    try:
        plain = pipe(**{**kwargs, "generator": torch.Generator().manual_seed(3)}).images
    finally:
        hook.remove()
    output, calls = record_calls(pipe, kwargs)
    assert len(calls) == len(recorded) == 4
    for call, model_input in zip(calls, recorded):
        torch.testing.assert_close(call.args[0], model_input, rtol=0, atol=0)
    torch.testing.assert_close(output.images, plain, rtol=0, atol=0)


def _calibrated(pipe, weight_bits=8, act_bits=8, seen=None):
    """A quantized copy of the UNet calibrated on 2 batches of 2 samples, 5 steps each;
    `seen` collects (batch, timestep) of every call the student is asked."""
    student = copy.deepcopy(pipe.unet)
    quantize_(student, QuantConfig(weight_bits=weight_bits, act_bits=act_bits))
    hook = student.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].shape[0], float(args[1].reshape(-1)[0]))),
        with_kwargs=True) if seen is not None else None
    try:
        calibrate(student, pipe, num_samples=4, steps=5, eta=1.0, guidance=2.0, batch_size=2)
    finally:
        if hook is not None:
            hook.remove()
    return student


def test_calibration_sees_every_call_and_fills_one_step_size_per_timestep(random_class_ldm_pipeline):
    pipe, seen = random_class_ldm_pipeline, []
    student = _calibrated(pipe, seen=seen)
    grid = trajectory_grid(family_for(pipe), 5, 2.0)
    # every call of both walks, on the teacher's inputs (conditional and null batched)
    assert seen == [(4, t) for t in grid.float().tolist()] * 2
    quantizers = [m for m in student.modules() if isinstance(m, TemporalActQuantizer)]
    assert quantizers
    for quantizer in quantizers:
        assert quantizer.timesteps.tolist() == sorted(grid.tolist())
        assert torch.isfinite(quantizer.scale).all() and (quantizer.scale > 0).all()
    assert any(q.scale.max() > 1.2 * q.scale.min() for q in quantizers)  # ranges move with t


def _relative_error(pipe, student) -> float:
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    context = pipe.class_context(torch.tensor([0, 9]), 2.0)
    t = trajectory_grid(family_for(pipe), 5, 2.0)[2]
    with torch.no_grad():
        teacher = pipe.guided_noise(latents, t, context, 2.0)
        quantized = pipe.guided_noise(latents, t, context, 2.0, denoiser=student)
    return float((quantized - teacher).norm() / teacher.norm())


def test_calibrated_students_of_the_embedded_teacher_track_it_by_bit_width(teacher):
    w8a8, w4a4 = _relative_error(teacher, _calibrated(teacher)), \
        _relative_error(teacher, _calibrated(teacher, 4, 4))
    assert 0 < w8a8 < 0.05  # measured 0.013
    assert w8a8 < w4a4 < 0.5  # measured 0.19
