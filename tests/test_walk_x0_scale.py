"""x0 weighting read from the pipeline's configured scheduler: the numbers the family
samplers compute, for the schedulers both know, and on the timesteps of recorded calls."""

from __future__ import annotations

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, DDIMScheduler, DDPMScheduler, \
    FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from qdiff.families.samplers import DDIMSampler, FlowMatchSampler
from qdiff.walk import is_flow_matching, record_calls, x0_scale
from walk_cases import CASES, STEPS

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULERS = {
    "ddim-epsilon": (DDIMScheduler(), DDIMSampler),
    "ddim-v": (CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing", snr_shift_scale=3.0), DDIMSampler),
    "flow-euler": (FlowMatchEulerDiscreteScheduler(shift=3.0), FlowMatchSampler),
    "unipc-flow": (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                           flow_shift=3.0), FlowMatchSampler),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_x0_scale_from_the_scheduler_equals_the_family_samplers(name):
    scheduler, sampler_class = SCHEDULERS[name]
    scheduler.set_timesteps(5)
    sampler = sampler_class(scheduler)
    assert is_flow_matching(scheduler) == (sampler_class is FlowMatchSampler)
    for timestep in scheduler.timesteps:
        assert x0_scale(scheduler, timestep) == sampler.x0_scale(timestep)


@pytest.mark.parametrize("case", ["wan/unipc-flow", "wan/flow-euler", "cogvideox/ddim-v",
                                  "sd/unipc", "sdxl/euler", "sd3.5/flow-euler",
                                  "wan2.2-ti2v/unipc-flow", "wan2.2-i2v-a14b/unipc-flow"])
def test_x0_scale_of_a_recorded_call_reads_the_pipelines_scheduler(case):
    """After the walk the scheduler still holds its grid: each call's timestep (one per
    sample as Wan and CogVideoX pass it, or a scalar as SD does) finds its sigma or alpha there."""
    walk = CASES[case]
    pipe = walk.pipe()
    _, calls = record_calls(pipe, walk.call_kwargs())
    if is_flow_matching(pipe.scheduler):
        scale = FlowMatchSampler.walk_of(pipe.scheduler, STEPS).x0_scale
    else:
        scale = DDIMSampler(pipe.scheduler).x0_scale
    for call in calls:
        assert x0_scale(pipe.scheduler, call.timestep) == scale(call.timestep.reshape(-1)[0])


@pytest.mark.parametrize("case", ["flux.1-dev/flow-euler", "qwen-image/flow-euler",
                                  "flux.2-dev/flow-euler"])
def test_x0_scale_of_a_call_passed_timestep_over_1000_is_the_sigma_of_its_step(case):
    """FLUX.1, FLUX.2 and Qwen-Image pass `t / 1000` (and shift their grid by resolution, `mu`):
    each call's x0 scale is the sigma the scheduler paired with that step's t."""
    walk = CASES[case]
    pipe = walk.pipe()
    _, calls = record_calls(pipe, walk.call_kwargs())
    assert walk.timestep_divisor == 1000
    for call in calls:
        step = call.index // walk.calls_per_step
        assert call.timestep.reshape(-1)[0] == pipe.scheduler.timesteps[step] / 1000
        assert x0_scale(pipe.scheduler, call.timestep) == float(pipe.scheduler.sigmas[step])


def test_a_timestep_over_1000_in_bf16_finds_its_sigma():
    """A bf16 pipeline divides the bf16 timestep: matched as the pipeline computes it."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    for step, t in enumerate(scheduler.timesteps):
        passed = t.expand(2).to(torch.bfloat16) / 1000
        assert x0_scale(scheduler, passed) == float(scheduler.sigmas[step])


def test_a_sample_prediction_moves_x0_one_to_one():
    assert x0_scale(DDPMScheduler(prediction_type="sample"), 500) == 1.0


def test_per_token_timesteps_count_by_the_noisiest_token():
    scheduler = DDIMScheduler()
    per_token = torch.tensor([[0, 700, 700], [0, 700, 700]])
    assert x0_scale(scheduler, per_token) == x0_scale(scheduler, 700)


def test_timesteps_the_scheduler_did_not_visit_are_refused():
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="not on the scheduler's grid"):
        x0_scale(scheduler, 123.0)
    with pytest.raises(ValueError, match="one timestep"):
        x0_scale(DDIMScheduler(), torch.tensor([10, 20]))
