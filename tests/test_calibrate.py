"""Teacher trajectories and PTQ calibration on the teacher's architecture (random weights)."""

from __future__ import annotations

import copy

import pytest
import torch

from qdiff.calibrate import calibrate
from qdiff.config import QuantConfig
from qdiff.distill.trajectory import teacher_trajectory, trajectory_timesteps
from qdiff.quant import TemporalActQuantizer, quantize_


def test_trajectory_follows_ddim_in_closed_form_when_the_noise_prediction_is_zero(
        random_class_ldm_pipeline):
    # With eps = 0 and eta = 0, DDIM maps x_t to sqrt(abar_prev / abar_t) x_t, so every
    # x_t along the walk is the initial noise times sqrt(abar_t / abar_first).
    pipe = random_class_ldm_pipeline
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    steps = list(teacher_trajectory(pipe, torch.tensor([1, 2]), steps=5, eta=0.0, guidance=3.0,
                                    generator=torch.Generator().manual_seed(0)))
    abar = pipe.scheduler.alphas_cumprod
    first = steps[0]
    assert [int(s.timestep) for s in steps] == trajectory_timesteps(pipe, 5).tolist()
    assert all(float(s.teacher_output.abs().max()) == 0.0 for s in steps)
    for step in steps[1:]:
        ratio = (abar[step.timestep] / abar[first.timestep]).sqrt()
        torch.testing.assert_close(step.model_input, first.model_input * ratio)


def test_trajectory_reproduces_the_pipelines_own_sampling(random_class_ldm_pipeline):
    pipe = random_class_ldm_pipeline
    labels = torch.tensor([4, 8])
    walked = list(teacher_trajectory(pipe, labels, steps=4, eta=0.0, guidance=2.0,
                                     generator=torch.Generator().manual_seed(3)))
    recorded = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: recorded.append(args[0].clone()))
    pipe(class_labels=labels, guidance_scale=2.0, num_inference_steps=4,
         generator=torch.Generator().manual_seed(3), output_type="pt")
    hook.remove()
    for step, model_input in zip(walked, recorded):
        torch.testing.assert_close(torch.cat([step.model_input] * 2), model_input)


def _calibrated(pipe, weight_bits=8, act_bits=8):
    student = copy.deepcopy(pipe.unet)
    quantize_(student, QuantConfig(weight_bits=weight_bits, act_bits=act_bits))
    calibrate(student, pipe, num_samples=4, steps=5, eta=1.0, guidance=2.0, batch_size=2)
    return student


def test_calibration_fills_one_step_size_per_trajectory_timestep(random_class_ldm_pipeline):
    pipe = random_class_ldm_pipeline
    student = _calibrated(pipe)
    quantizers = [m for m in student.modules() if isinstance(m, TemporalActQuantizer)]
    assert quantizers
    expected = sorted(trajectory_timesteps(pipe, 5).tolist())
    for quantizer in quantizers:
        assert quantizer.timesteps.tolist() == expected
        assert torch.isfinite(quantizer.scale).all() and (quantizer.scale > 0).all()
    assert any(q.scale.max() > 1.2 * q.scale.min() for q in quantizers)  # ranges move with t


def _relative_error(pipe, student) -> float:
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    context = pipe.class_context(torch.tensor([0, 9]), 2.0)
    t = trajectory_timesteps(pipe, 5)[2]
    with torch.no_grad():
        teacher = pipe.guided_noise(latents, t, context, 2.0)
        quantized = pipe.guided_noise(latents, t, context, 2.0, denoiser=student)
    return float((quantized - teacher).norm() / teacher.norm())


def test_calibrated_students_of_the_embedded_teacher_track_it_by_bit_width(teacher):
    w8a8, w4a4 = _relative_error(teacher, _calibrated(teacher)), \
        _relative_error(teacher, _calibrated(teacher, 4, 4))
    assert 0 < w8a8 < 0.05  # measured 0.013
    assert w8a8 < w4a4 < 0.5  # measured 0.19


@pytest.mark.parametrize("steps", [5, 50])
def test_update_scale_is_how_far_a_noise_error_moves_the_ddim_step(random_class_ldm_pipeline,
                                                                    steps):
    from diffusers import DDIMScheduler

    from qdiff.families.samplers import ddim_update_scale

    scheduler = DDIMScheduler.from_config(random_class_ldm_pipeline.scheduler.config)
    scheduler.set_timesteps(steps)
    x_t, eps = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    for t in scheduler.timesteps[[0, len(scheduler.timesteps) // 2, -1]]:
        base = scheduler.step(eps, t, x_t, eta=0.0).prev_sample
        moved = scheduler.step(eps + 0.01, t, x_t, eta=0.0).prev_sample
        torch.testing.assert_close((moved - base) / 0.01,
                                   torch.full_like(base, ddim_update_scale(scheduler, int(t))),
                                   atol=1e-3, rtol=1e-3)
