"""Wan 2.1 and CogVideoX families on tiny random pipelines: the family's call is the
diffusers pipeline's own sampling, its denoiser calls carry the model's latent layout and the
empty prompt as the null condition, and the configs say what to fix."""

from __future__ import annotations

import pytest
import torch

from qdiff.config import ConfigError, ModelConfig
from qdiff.families import FAMILIES, family_for, frames_side_by_side
from qdiff.walk import record_calls
from tiny_families import PROMPTS, tiny_cogvideox, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")
FRAMES, HEIGHT, WIDTH = 5, 16, 16

BUILDS = {"wan": (tiny_wan, "wan"), "cogvideox": (tiny_cogvideox, "cogvideox"),
          "cogvideox-sincos": (lambda: tiny_cogvideox(rotary=False), "cogvideox")}


@pytest.fixture(scope="module", params=list(BUILDS))
def family(request, tmp_path_factory):
    build, kind = BUILDS[request.param]
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    family = family_for(pipe, ModelConfig(prompts=str(prompts), video_size=[FRAMES, HEIGHT, WIDTH]))
    assert type(family) is FAMILIES[kind] and family.num_conditions == len(PROMPTS)
    return family


def _step_calls(family, steps=2):
    """The denoiser calls of the first denoising step of a walk of conditions 1 and 3."""
    kwargs = family.call_kwargs(torch.tensor([1, 3]), torch.Generator().manual_seed(0), steps, 4.0)
    _, calls = record_calls(family.pipe, kwargs)
    first = calls[0].timestep.reshape(-1)[0]
    return [call for call in calls if call.timestep.reshape(-1)[0] == first]


def test_the_familys_call_is_the_pipelines_own_sampling(family):
    """Same prompts, seed, guidance and steps: `family.call_kwargs` asks the pipeline for what
    it samples when called by hand, and `to_images` lays its frames side by side."""
    frames = family.pipe(prompt=[PROMPTS[0], PROMPTS[2]], num_frames=FRAMES, height=HEIGHT,
                         width=WIDTH, num_inference_steps=3, guidance_scale=4.0, output_type="pt",
                         generator=torch.Generator().manual_seed(1)).frames
    output = family.pipe(**family.call_kwargs(torch.tensor([0, 2]), torch.Generator().manual_seed(1),
                                              3, 4.0, output_type="pt"))
    images = family.to_images(output)
    expected = frames_side_by_side(frames.float())
    assert images.shape == expected.shape and images.shape[1] == 3
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)


def test_the_denoiser_sees_latents_in_the_models_layout(family):
    calls = _step_calls(family)
    shapes = [tuple(call.kwargs["hidden_states"].shape) for call in calls]
    if type(family) is FAMILIES["wan"]:  # (B, C, F, H, W); a call per guidance branch
        assert shapes == [(2, 4, 2, 2, 2)] * 2
    else:  # CogVideoX: (B, F, C, H, W); both branches in one call
        assert shapes == [(4, 2, 4, 2, 2)]


def test_the_null_condition_is_the_empty_prompt(family):
    """Of the text states the first step's calls carry, two rows are the empty prompt's (one
    per sample), the others the samples' prompts."""
    rows = torch.cat([call.kwargs["encoder_hidden_states"] for call in _step_calls(family)])
    assert len(rows) == 4
    length = rows.shape[1]
    with torch.no_grad():
        empty, _ = family.pipe.encode_prompt([""], do_classifier_free_guidance=False,
                                             max_sequence_length=length)
        prompted, _ = family.pipe.encode_prompt([PROMPTS[1], PROMPTS[3]],
                                                do_classifier_free_guidance=False,
                                                max_sequence_length=length)
    is_empty = [torch.allclose(row, empty[0].to(row.dtype)) for row in rows]
    assert sum(is_empty) == 2
    conditional = rows[[not flag for flag in is_empty]]
    torch.testing.assert_close(conditional, prompted.to(rows.dtype))


@pytest.mark.parametrize("family_name", ["wan", "cogvideox"])
def test_video_configs_say_what_is_missing(family_name):
    with pytest.raises(ConfigError, match=f"model.family='{family_name}' distils from prompts"):
        ModelConfig(family=family_name)
    with pytest.raises(ConfigError, match=r"must be \[frames, height, width\]"):
        ModelConfig(family=family_name, prompts="p.txt", video_size=[480, 832])
