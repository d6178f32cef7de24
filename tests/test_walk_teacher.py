"""The teacher walker: the trajectory qdiff records is the one `pipe(...)` samples."""

from __future__ import annotations

import pytest
import torch

from qdiff.walk import DenoiserProxy, DenoiserTap, pipeline_timesteps, record_calls
from walk_cases import CASES, STEPS

pytestmark = pytest.mark.usefixtures("one_thread")


def _output_tensor(output) -> torch.Tensor:
    """The images or frames of a pipeline output, as a tensor."""
    value = output[0]
    return torch.as_tensor(value) if not isinstance(value, list) else torch.stack(value)


def _call_timestep(timestep: torch.Tensor) -> torch.Tensor:
    """The step's timestep of a call (its first sample's): per-token timesteps (B, L) by the
    noisiest token, as `qdiff.walk.x0` reads them -- Wan 2.2 TI2V's image tokens are at 0."""
    return timestep.amax(dim=1)[0] if timestep.dim() == 2 else timestep.reshape(-1)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_recorded_walk_samples_bit_identically_to_the_stock_pipeline(case):
    """Same conditions, one generator per sample, the configured scheduler: the tapped call's
    samples equal the untapped call's bit for bit, and every denoiser call is recorded."""
    walk = CASES[case]
    pipe = walk.pipe()
    expected = _output_tensor(pipe(**walk.call_kwargs()))
    output, calls = record_calls(pipe, walk.call_kwargs())

    assert torch.equal(_output_tensor(output), expected)
    assert len(calls) == STEPS * walk.calls_per_step
    assert [call.index for call in calls] == list(range(len(calls)))
    assert {call.component for call in calls} == walk.denoisers
    visited = pipe.scheduler.timesteps.repeat_interleave(walk.calls_per_step).to(
        calls[0].timestep.dtype)
    if walk.timestep_divisor != 1:  # as the pipeline divides it (FLUX: `timestep / 1000`)
        visited = visited / walk.timestep_divisor
    assert torch.equal(torch.stack([_call_timestep(call.timestep) for call in calls]).cpu(), visited)
    assert not any(isinstance(getattr(pipe, name), DenoiserProxy) for name in walk.denoisers)


@pytest.mark.parametrize("case", ["sd/ddim", "wan/flow-euler"])
def test_a_recorded_call_asked_again_gives_the_teachers_answer(case):
    walk = CASES[case]
    pipe = walk.pipe()
    _, calls = record_calls(pipe, walk.call_kwargs())
    teacher = getattr(pipe, walk.denoiser)
    with torch.no_grad():
        for call in calls:
            answer = call.ask(teacher)
            assert torch.equal(answer[0], call.output)


def test_the_tap_restores_the_components_after_an_error():
    walk = CASES["sd/ddim"]
    pipe = walk.pipe()
    unet, entry = pipe.unet, pipe.config["unet"]

    def fail(component, index, args, kwargs):
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        with DenoiserTap(pipe, fail):
            assert isinstance(pipe.unet, DenoiserProxy) and pipe.components["unet"] is pipe.unet
            pipe(**walk.call_kwargs())
    assert pipe.unet is unet and pipe.components["unet"] is unet
    assert pipe.config["unet"] == entry


def test_the_proxy_reads_as_the_model_it_stands_for():
    pipe = CASES["cogvideox/ddim-v"].pipe()
    transformer = pipe.transformer
    with DenoiserTap(pipe, lambda *call: None):
        proxy = pipe.transformer
        assert proxy.config is transformer.config and proxy.dtype == transformer.dtype
        assert proxy.device == transformer.device and pipe._execution_device == transformer.device
        assert proxy.cache_context.__self__ is transformer
        assert set(pipe.components) == set(CASES["cogvideox/ddim-v"].pipe().components)


@pytest.mark.parametrize("case", ["dit/ddim", "sd/ddim"])
def test_model_cpu_offload_survives_the_tap(case):
    """diffusers re-hooks the components (then the proxy) at the end of `__call__`; after the
    tap the original denoiser carries the offload hook again. DiT's transformer is its first
    component, so `_execution_device` reads the hook through the proxy."""
    pytest.importorskip("accelerate")
    walk = CASES[case]
    pipe = walk.pipe()
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks' execution device: cpu:0
    expected = _output_tensor(pipe(**walk.call_kwargs()))
    denoiser = getattr(pipe, walk.denoiser)

    def answer(component, index, args, kwargs):
        assert pipe._execution_device == torch.device("cpu", 0)
        return tap.original(component)(*args, **kwargs)

    with DenoiserTap(pipe, answer) as tap:
        output = _output_tensor(pipe(**walk.call_kwargs()))
    assert tap.calls == STEPS and torch.equal(output, expected)
    assert getattr(pipe, walk.denoiser) is denoiser and hasattr(denoiser, "_hf_hook")
    assert any(hook.model is denoiser for hook in pipe._all_hooks)
    _, calls = record_calls(pipe, walk.call_kwargs())
    assert len(calls) == STEPS and all(call.timestep is not None for call in calls)
    assert torch.equal(_output_tensor(pipe(**walk.call_kwargs())), expected)


def test_the_embedded_teachers_recorded_walk_is_its_sampling(teacher):
    kwargs = dict(class_labels=[3, 8], guidance_scale=2.0, num_inference_steps=STEPS,
                  output_type="pt")
    expected = teacher(**kwargs, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    output, calls = record_calls(teacher, {
        **kwargs, "generator": [torch.Generator().manual_seed(s) for s in (5, 6)]})
    assert torch.equal(output.images, expected.images) and len(calls) == STEPS
    assert calls[0].args[0].shape[0] == 4  # guidance batches both branches in one call


@pytest.mark.parametrize("case", ["sd/unipc", "wan/unipc-flow", "cogvideox/ddim-v",
                                  "wan2.2-two-experts/flow-euler", "flux.1-dev/flow-euler",
                                  "qwen-image/flow-euler", "wan2.2-i2v-a14b/unipc-flow"])
def test_the_grid_a_call_visits_is_read_before_the_denoiser_runs(case):
    walk = CASES[case]
    pipe = walk.pipe()
    pipe(**walk.call_kwargs())
    visited = pipe.scheduler.timesteps.clone()
    dynamic_shift = pipe.scheduler.config.get("use_dynamic_shifting")  # FLUX, Qwen: needs `mu`
    pipe.scheduler.set_timesteps(7, **({"mu": 0.5} if dynamic_shift else {}))
    assert torch.equal(pipeline_timesteps(pipe, walk.call_kwargs()), visited)
    assert not any(isinstance(getattr(pipe, name), DenoiserProxy) for name in walk.denoisers)
