"""Wan 2.1 and CogVideoX adapters on tiny random pipelines: the teacher's walk through the
adapter samples what the diffusers pipeline itself samples, and the configs say what to fix."""

from __future__ import annotations

import pytest
import torch

from qdiff.config import ConfigError, ModelConfig
from qdiff.families import CogVideoXFamily, WanFamily, family_for
from qdiff.families.class_wan import frames_side_by_side
from tiny_families import PROMPTS, tiny_cogvideox, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")
FRAMES, HEIGHT, WIDTH = 5, 16, 16

BUILDS = {"wan": (tiny_wan, WanFamily), "cogvideox": (tiny_cogvideox, CogVideoXFamily),
          "cogvideox-sincos": (lambda: tiny_cogvideox(rotary=False), CogVideoXFamily)}


@pytest.fixture(scope="module", params=list(BUILDS))
def family(request, tmp_path_factory):
    build, kind = BUILDS[request.param]
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    adapter = family_for(pipe, ModelConfig(prompts=str(prompts), video_size=[FRAMES, HEIGHT, WIDTH]))
    assert type(adapter) is kind and adapter.num_conditions == len(PROMPTS)
    return adapter


def test_adapter_sampling_is_the_pipelines_own_sampling(family):
    """Same prompts, seed, guidance and steps: the adapter's teacher walk (its own latents,
    prompt cache, null prompt and sampler) decodes to the pipeline's frames."""
    conditions = torch.tensor([0, 2])
    frames = family.pipe(prompt=[PROMPTS[0], PROMPTS[2]], num_frames=FRAMES, height=HEIGHT,
                         width=WIDTH, num_inference_steps=3, guidance_scale=4.0, output_type="pt",
                         generator=torch.Generator().manual_seed(1)).frames
    images = family.sample_images(family.denoiser, conditions, 4.0, 3,
                                  torch.Generator().manual_seed(1))
    expected = frames_side_by_side(frames.transpose(1, 2).float())
    assert images.shape == expected.shape and images.shape[1] == 3
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


def test_latents_follow_the_models_layout(family):
    shape = family.latent_shape(2)
    if isinstance(family, WanFamily):  # (B, C, F, H, W)
        assert shape == (2, 4, 2, 2, 2)
    else:  # CogVideoX: (B, F, C, H, W)
        assert shape == (2, 2, 4, 2, 2)
    assert family.prepare_latents(2, torch.Generator().manual_seed(0)).shape == shape


def test_the_null_condition_is_the_empty_prompt(family):
    context = family.context(torch.tensor([1, 3]), 4.0)
    assert context.shape[0] == 4 and not context.requires_grad
    torch.testing.assert_close(context[2], context[3])
    torch.testing.assert_close(context[2], family._encode("").float())


@pytest.mark.parametrize("family_name", ["wan", "cogvideox"])
def test_video_configs_say_what_is_missing(family_name):
    with pytest.raises(ConfigError, match=f"model.family='{family_name}' distils from prompts"):
        ModelConfig(family=family_name)
    with pytest.raises(ConfigError, match=r"must be \[frames, height, width\]"):
        ModelConfig(family=family_name, prompts="p.txt", video_size=[480, 832])
