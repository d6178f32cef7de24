"""x0 weighting read from the pipeline's configured scheduler: the closed forms (epsilon
sqrt((1 - a) / a), v sqrt(1 - a), flow matching the step's sigma), for the schedulers
qdiff's families ship, and on the timesteps of recorded calls."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, DDIMScheduler, DDPMScheduler, \
    FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from qdiff.walk import is_flow_matching, record_calls, x0_scale
from walk_cases import CASES

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULERS = {  # the scheduler, and whether it is flow matching
    "ddim-epsilon": (DDIMScheduler(), False),
    "ddim-v": (CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                      timestep_spacing="trailing", snr_shift_scale=3.0), False),
    "flow-euler": (FlowMatchEulerDiscreteScheduler(shift=3.0), True),
    "unipc-flow": (UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                           flow_shift=3.0), True),
}


def closed_form(scheduler, timestep) -> float:
    """d x0 / d output by hand: x_t = (1 - sigma) x0 + sigma noise with v = noise - x0 gives
    sigma (the sigma the grid pairs with t); x_t = sqrt(a) x0 + sqrt(1 - a) eps gives
    sqrt((1 - a) / a) for epsilon, sqrt(1 - a) for v (x0 = sqrt(a) x_t - sqrt(1 - a) v)."""
    t = float(torch.as_tensor(timestep).reshape(-1)[0])
    if is_flow_matching(scheduler):
        step = int((scheduler.timesteps.float() == t).nonzero()[0])
        return float(scheduler.sigmas[step])
    a = float(scheduler.alphas_cumprod[int(round(t))])
    kind = scheduler.config.prediction_type
    assert kind in ("epsilon", "v_prediction"), kind
    return math.sqrt((1 - a) / a) if kind == "epsilon" else math.sqrt(1 - a)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_x0_scale_from_the_scheduler_is_the_closed_form(name):
    scheduler, flow = SCHEDULERS[name]
    scheduler.set_timesteps(5)
    assert is_flow_matching(scheduler) == flow
    scales = [x0_scale(scheduler, timestep) for timestep in scheduler.timesteps]
    for timestep, scale in zip(scheduler.timesteps, scales):
        assert scale == pytest.approx(closed_form(scheduler, timestep), rel=1e-12)
    assert scales == sorted(scales, reverse=True)  # the noisy start weighs most
    if flow:  # sigma, taken at each step in turn (a repeated timestep would not tell them apart)
        assert scales == pytest.approx([float(s) for s in scheduler.sigmas[:5]], rel=1e-12)


@pytest.mark.parametrize("case", ["wan/unipc-flow", "wan/flow-euler", "cogvideox/ddim-v",
                                  "sd/unipc", "sdxl/euler", "sd3.5/flow-euler",
                                  "wan2.2-ti2v/unipc-flow", "wan2.2-i2v-a14b/unipc-flow"])
def test_x0_scale_of_a_recorded_call_reads_the_pipelines_scheduler(case):
    """After the walk the scheduler still holds its grid: each call's timestep (one per
    sample as Wan and CogVideoX pass it, or a scalar as SD does) finds its sigma or alpha there."""
    walk = CASES[case]
    pipe = walk.pipe()
    _, calls = record_calls(pipe, walk.call_kwargs())
    assert calls
    for call in calls:
        assert x0_scale(pipe.scheduler, call.timestep) == pytest.approx(
            closed_form(pipe.scheduler, call.timestep), rel=1e-12)


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
