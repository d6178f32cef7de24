"""User LoRAs on an export (`qdiff.export.lora`): diffusers' LoRA API on the integer pipeline.

On tiny random SD, FLUX and Wan pipelines a random LoRA in diffusers' format (built with PEFT
on the float denoiser, saved with the pipeline's `save_lora_weights`) is loaded into the float
pipeline and into its export: at every layer the LoRA adds the same thing to the integer layer
as to the float one (float rounding); the denoiser output and the images move the same way;
`set_adapters` weights, `disable_lora`, and `unload_lora_weights` (the exact pre-LoRA outputs)
behave as on the float pipeline; `fuse_lora` is refused.

Every other tiny family whose diffusers pipeline has a LoRA loader -- SDXL, SD3, Qwen-Image,
FLUX.2, Wan 2.2 I2V (`WanImageToVideoPipeline`), LTX-2 and CogVideoX (`MORE_FAMILIES`) -- runs
one lighter test: the LoRA takes every target (attention and other layers) on an integer layer,
each LoRA layer adds the float one's branch, the denoiser output moves as the float one's, and
`unload_lora_weights` gives back the export's output bit for bit. HunyuanVideo 1.5 and DiT
are not tested: their pipelines have no LoRA loader.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from qdiff.calibrate import calibrate  # noqa: E402
from qdiff.config import LoRAConfig, ModelConfig, QuantConfig  # noqa: E402
from qdiff.export import IntLayer, SplitIntLayer, quantized_class_for  # noqa: E402
from qdiff.export.lora import IntLoraConv2d, IntLoraConv3d, IntLoraLinear, LoraFusionError  # noqa: E402
from qdiff.families import family_for  # noqa: E402
from qdiff.quant import quantize_, timestep_context  # noqa: E402
from tiny_families import (FLUX2_TEXT_LAYERS, PROMPTS, tiny_cogvideox, tiny_flux,  # noqa: E402
                           tiny_flux2, tiny_image, tiny_ltx2, tiny_qwen_image,
                           tiny_stable_diffusion, tiny_stable_diffusion_3,
                           tiny_stable_diffusion_xl, tiny_wan, tiny_wan22_i2v)

pytestmark = pytest.mark.usefixtures("one_thread", "quiet")


@dataclass
class Family:
    name: str
    build: Callable
    denoiser: str
    lora_arg: str  # save_lora_weights' argument for the denoiser's layers
    targets: list[str]
    call: dict  # pipeline call kwargs, but the generator
    # ModelConfig fields for the export's calibration (sizes, pipeline_kwargs); default: the
    # call's size (and an image-to-video call's first frames)
    model: dict = field(default_factory=dict)


FAMILIES = {
    "sd": Family("sd", tiny_stable_diffusion, "unet", "unet_lora_layers",
                 ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2",
                  "conv_shortcut"],
                 dict(prompt="a red bus", height=16, width=16, num_inference_steps=2,
                      guidance_scale=1.0)),
    "flux": Family("flux", tiny_flux, "transformer", "transformer_lora_layers",
                   ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out",
                    "ff.net.2"],
                   dict(prompt="a red bus", height=16, width=16, num_inference_steps=2,
                        guidance_scale=3.5, max_sequence_length=8)),
    "wan": Family("wan", tiny_wan, "transformer", "transformer_lora_layers",
                  ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2",
                   "patch_embedding"],
                  dict(prompt="a red bus", height=16, width=16, num_frames=5, num_inference_steps=2,
                       guidance_scale=1.0, max_sequence_length=8)),
}


# Every other family whose pipeline has a LoRA loader: the lighter test below only (the
# image comparisons of `pipes` would not fit the suite's time). Targets: attention and at
# least one non-attention layer (MLP, modulation, patch embedding, resnet conv).
MORE_FAMILIES = {
    "sdxl": Family("sdxl", tiny_stable_diffusion_xl, "unet", "unet_lora_layers",
                   ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1",
                    "conv_shortcut", "time_emb_proj"],
                   dict(prompt="a red bus", height=16, width=16, num_inference_steps=2,
                        guidance_scale=1.0)),
    "sd3": Family("sd3", tiny_stable_diffusion_3, "transformer", "transformer_lora_layers",
                  ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "ff.net.2",
                   "ff_context.net.0.proj", "norm1.linear"],
                  dict(prompt="a red bus", height=8, width=8, num_inference_steps=2,
                       guidance_scale=1.0, max_sequence_length=8),
                  dict(image_size=[8, 8], pipeline_kwargs=dict(max_sequence_length=8))),
    "qwen-image": Family("qwen-image", tiny_qwen_image, "transformer", "transformer_lora_layers",
                         ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "to_add_out",
                          "img_mlp.net.2", "txt_mlp.net.0.proj", "img_mod.1"],
                         dict(prompt="a red bus", height=16, width=16, num_inference_steps=2,
                              true_cfg_scale=1.0)),
    "flux2": Family("flux2", tiny_flux2, "transformer", "transformer_lora_layers",
                    ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_qkv_mlp_proj",
                     "linear_in", "linear_out"],
                    dict(prompt="a red bus", height=8, width=8, num_inference_steps=2,
                         guidance_scale=4.0, max_sequence_length=40,
                         text_encoder_out_layers=FLUX2_TEXT_LAYERS),
                    dict(image_size=[8, 8], pipeline_kwargs=dict(
                        max_sequence_length=40, text_encoder_out_layers=list(FLUX2_TEXT_LAYERS)))),
    "wan-i2v": Family("wan-i2v", tiny_wan22_i2v, "transformer", "transformer_lora_layers",
                      ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2",
                       "patch_embedding"],
                      dict(image=tiny_image(), prompt="a red bus", height=16, width=16,
                           num_frames=5, num_inference_steps=2, guidance_scale=1.0,
                           guidance_scale_2=1.0, max_sequence_length=8)),
    "ltx2": Family("ltx2", tiny_ltx2, "transformer", "transformer_lora_layers",
                   ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "audio_ff.net.2",
                    "proj_in", "audio_proj_in"],
                   dict(prompt="a red bus", height=32, width=32, num_frames=5,
                        num_inference_steps=2, guidance_scale=1.0, max_sequence_length=16,
                        spatio_temporal_guidance_blocks=[0]),
                   dict(video_size=[5, 32, 32], pipeline_kwargs=dict(
                       max_sequence_length=16, spatio_temporal_guidance_blocks=[0]))),
    "cogvideox": Family("cogvideox", tiny_cogvideox, "transformer", "transformer_lora_layers",
                        ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                         "norm1.linear", "patch_embed.proj"],
                        dict(prompt="a red bus", height=16, width=16, num_frames=5,
                             num_inference_steps=2, guidance_scale=1.0)),
}

# W8A8 with per-token activations: the exports' own error stays well below the LoRA's move, so
# whole outputs can be compared; the layer-level check holds at any precision (see the split test).
EXPORT_QUANT = QuantConfig(weight_bits=8, act_bits=8, act_mode="dynamic_per_token")


def _export(pipe, family: Family, folder, quant: QuantConfig = EXPORT_QUANT):
    """A copy of `pipe` whose denoiser is the integer model of a calibrated student."""
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    sizes = family.model or ({"video_size": [5, 16, 16]} if "num_frames" in family.call
                             else {"image_size": [16, 16]})
    if "image" in family.call:  # image to video: a folder of first frames
        (folder / "frames").mkdir(exist_ok=True)
        family.call["image"].save(folder / "frames" / "0.png")
        sizes = {**sizes, "images": str(folder / "frames")}
    student = copy.deepcopy(getattr(pipe, family.denoiser))
    quantize_(student, quant, LoRAConfig())
    calibrate(student, family_for(pipe, ModelConfig(prompts=str(prompts), **sizes)), 2, 2, 0.0, 1.0)
    integer = quantized_class_for(student).from_student(student, {})
    exported = copy.copy(pipe)
    exported.register_modules(**{family.denoiser: integer})
    return exported


def _random_lora(pipe, family: Family, folder, seed: int = 1) -> str:
    """A random LoRA of the float denoiser, saved in diffusers' format; returns the file."""
    model = copy.deepcopy(getattr(pipe, family.denoiser))
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=family.targets,
                                 init_lora_weights=False))
    state = get_peft_model_state_dict(model)
    folder = folder / f"lora-{seed}"
    type(pipe).save_lora_weights(folder, **{family.lora_arg: state})
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module", params=list(FAMILIES))
def pipes(request, tmp_path_factory):
    """(family, float pipeline, its export, LoRA file)."""
    family = FAMILIES[request.param]
    pipe = family.build()
    folder = tmp_path_factory.mktemp(request.param)
    exported = _export(pipe, family, folder)
    lora = _random_lora(pipe, family, folder)
    return family, pipe, exported, lora


def _denoise(pipe, family: Family) -> torch.Tensor:
    """The denoiser's output on one fixed input (captured from a pipeline call's first step)."""
    model = getattr(pipe, family.denoiser)
    if not hasattr(pipe, "_qdiff_probe"):
        captured = {}

        def grab(module, args, kwargs):
            captured.setdefault("call", (args, {k: v for k, v in kwargs.items()}))

        handle = model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            pipe(**family.call, generator=torch.Generator().manual_seed(0), output_type="latent")
        finally:
            handle.remove()
        pipe._qdiff_probe = captured["call"]
    args, kwargs = pipe._qdiff_probe
    with torch.no_grad():
        out = model(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out.sample).float()


def _images(pipe, family: Family) -> torch.Tensor:
    out = pipe(**family.call, generator=torch.Generator().manual_seed(0), output_type="pt")
    return (out.images if hasattr(out, "images") else out.frames).float()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _layer_input(layer: nn.Module, gen: torch.Generator) -> torch.Tensor:
    """A random input for a LoRA-wrapped Linear or Conv (PEFT's conv LoRA has `_kernel_dim`)."""
    dims = getattr(layer, "_kernel_dim", None)
    if dims is None:
        return torch.randn(2, 3, layer.in_features, generator=gen)
    return torch.randn(1, layer.in_features, *(6,) * (dims - 2), generator=gen)


def _check_layers(family: Family, pipe, exported) -> list[nn.Module]:
    """Every LoRA layer of the export adds what the float pipeline's adds, on the same input
    (float rounding); returns the export's LoRA layers."""
    float_layers = {n: m for n, m in getattr(pipe, family.denoiser).named_modules()
                    if isinstance(m, BaseTunerLayer)}
    denoiser = getattr(exported, family.denoiser)
    int_layers = {n: m for n, m in denoiser.named_modules() if isinstance(m, BaseTunerLayer)}
    assert float_layers.keys() == int_layers.keys() and float_layers
    wrapped = [m for m in int_layers.values()
               if isinstance(m, (IntLoraLinear, IntLoraConv2d, IntLoraConv3d))]
    assert wrapped, "no integer layer took the LoRA"
    assert not any(hasattr(m.get_base_layer(), "weight") for m in wrapped)  # no float weight made
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), timestep_context(denoiser).use(0.5):  # any step: the nearest table
        for name, int_layer in int_layers.items():
            x = _layer_input(int_layer, gen)
            f = float_layers[name]
            float_delta = f(x) - f.base_layer(x)
            int_delta = int_layer(x) - int_layer.base_layer(x)
            assert float_delta.abs().max() > 0, name
            torch.testing.assert_close(int_delta, float_delta, rtol=1e-5, atol=1e-5, msg=name)
    return wrapped


def test_lora_branch_matches_the_float_one_at_every_layer(pipes):
    family, pipe, exported, lora = pipes
    pipe.load_lora_weights(lora, adapter_name="style")
    exported.load_lora_weights(lora, adapter_name="style")
    try:
        wrapped = _check_layers(family, pipe, exported)
        kinds = {type(m) for m in wrapped}
        assert IntLoraLinear in kinds
        assert {"sd": IntLoraConv2d, "wan": IntLoraConv3d}.get(family.name, IntLoraLinear) in kinds
    finally:
        pipe.unload_lora_weights()
        exported.unload_lora_weights()


def test_split_layers_take_a_lora(tmp_path):
    """SD at W4A4 with timestep tables and split concatenated inputs: an up block's resnet
    conv_shortcut (decoder and skip channels, each with its own table) is a SplitIntLayer; the LoRA
    wraps it whole, as a conv LoRA on the whole input."""
    family = FAMILIES["sd"]
    pipe = family.build()
    exported = _export(pipe, family, tmp_path, QuantConfig(split_concat_inputs=True))
    lora = _random_lora(pipe, family, tmp_path)
    pipe.load_lora_weights(lora)
    exported.load_lora_weights(lora)
    wrapped = _check_layers(family, pipe, exported)
    assert any(isinstance(m.get_base_layer(), SplitIntLayer) for m in wrapped)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # a second adapter, as on float
def test_outputs_move_the_same_way_and_unload_is_exact(pipes, tmp_path):
    family, pipe, exported, lora = pipes
    float_before, int_before = _denoise(pipe, family), _denoise(exported, family)
    float_images, int_images = _images(pipe, family), _images(exported, family)
    pipe.load_lora_weights(lora, adapter_name="style")
    exported.load_lora_weights(lora, adapter_name="style")
    float_move = _denoise(pipe, family) - float_before
    int_move = _denoise(exported, family) - int_before
    quant_error = (int_before - float_before).norm()
    # the LoRA moves both outputs alike: same direction, same size (up to the quantization
    # error, which the LoRA's larger move dwarfs)
    assert float_move.norm() > 2 * quant_error
    assert _cosine(int_move, float_move) > 0.9
    assert (int_move.norm() / float_move.norm() - 1).abs() < 0.2
    image_float_move = _images(pipe, family) - float_images
    image_int_move = _images(exported, family) - int_images
    assert _cosine(image_int_move, image_float_move) > 0.8

    # adapter weights scale the branch as on the float pipeline; disable / enable; unload
    pipe.set_adapters("style", 0.5)
    exported.set_adapters("style", 0.5)
    half_float, half_int = _denoise(pipe, family) - float_before, _denoise(exported, family) - int_before
    assert _cosine(half_int, half_float) > 0.9
    assert half_int.norm() < 0.75 * int_move.norm()
    # two adapters with weights; deleting one leaves the other's outputs
    other = _random_lora(pipe, family, tmp_path, seed=2)
    pipe.load_lora_weights(other, adapter_name="other")
    exported.load_lora_weights(other, adapter_name="other")
    for target in (pipe, exported):
        target.set_adapters(["style", "other"], adapter_weights=[1.0, 0.5])
    both_float, both_int = _denoise(pipe, family) - float_before, _denoise(exported, family) - int_before
    assert _cosine(both_int, both_float) > 0.9 and _cosine(both_int, int_move) < 0.999
    exported.delete_adapters("other")
    torch.testing.assert_close(_denoise(exported, family), int_move + int_before)
    exported.disable_lora()
    assert torch.equal(_denoise(exported, family), int_before)
    exported.enable_lora()
    exported.set_adapters("style", 1.0)
    torch.testing.assert_close(_denoise(exported, family), int_move + int_before)

    with pytest.raises(LoraFusionError, match="float branch"):
        exported.fuse_lora()
    with pytest.raises(ValueError, match="unload_lora_weights"):
        getattr(exported, family.denoiser).save_pretrained(tmp_path)
    pipe.unload_lora_weights()
    exported.unload_lora_weights()
    denoiser = getattr(exported, family.denoiser)
    assert not any(isinstance(m, BaseTunerLayer) for m in denoiser.modules())
    assert torch.equal(_denoise(exported, family), int_before)
    assert torch.equal(_images(exported, family), int_images)


def _kohya(lora: str) -> dict[str, torch.Tensor]:
    """The SD LoRA file's weights under kohya / civitai key names (lora_unet_..., lora_down /
    lora_up, alpha)."""
    kohya = {}
    for key, value in load_file(lora).items():
        module, rest = key.removeprefix("unet.").rsplit(".lora_", 1)
        base = "lora_unet_" + module.replace(".", "_")
        kohya[f"{base}.lora_{'down' if rest.startswith('A') else 'up'}.weight"] = value
        if rest.startswith("A"):
            kohya[f"{base}.alpha"] = torch.tensor(float(value.shape[0]))
    return kohya


def test_kohya_keys_load_as_diffusers_keys(pipes):
    """diffusers converts kohya-style keys before PEFT sees them: the export takes them too."""
    family, pipe, exported, lora = pipes
    if family.name != "sd":
        pytest.skip("kohya keys are written here for SD's UNet names")
    exported.load_lora_weights(lora, adapter_name="diffusers")
    expected = _denoise(exported, family)
    exported.unload_lora_weights()
    exported.load_lora_weights(_kohya(lora), adapter_name="kohya")
    try:
        assert torch.equal(_denoise(exported, family), expected)
    finally:
        exported.unload_lora_weights()


def test_a_partial_load_keeps_the_integer_codes(pipes, tmp_path):
    """PEFT loads a LoRA with `load_state_dict(strict=False)` over the whole model: integer
    layers whose codes a fast kernel holds as int8 must not drop them for keys not given."""
    family, pipe, _, _ = pipes
    exported = _export(pipe, family, tmp_path)  # fresh: on the first call the codes become int8
    before = _denoise(exported, family)
    denoiser = getattr(exported, family.denoiser)
    assert any(m.int8 is not None for m in denoiser.modules() if isinstance(m, IntLayer))
    denoiser.load_state_dict({}, strict=False)
    assert torch.equal(_denoise(exported, family), before)


@pytest.mark.parametrize("name", list(MORE_FAMILIES))
def test_every_lora_family_takes_a_lora_at_every_layer_and_unloads_exactly(name, tmp_path):
    """SDXL, SD3, Qwen-Image, FLUX.2, Wan 2.2 I2V, LTX-2 and CogVideoX: the LoRA loads on the
    export through the family's own loader, every target takes it on an integer layer, each
    LoRA layer adds the float pipeline's branch, the denoiser output moves as on the float
    pipeline, and `unload_lora_weights` gives back the export's own output bit for bit."""
    family = MORE_FAMILIES[name]
    pipe = family.build()
    exported = _export(pipe, family, tmp_path)
    lora = _random_lora(pipe, family, tmp_path)
    float_before, int_before = _denoise(pipe, family), _denoise(exported, family)
    pipe.load_lora_weights(lora)
    exported.load_lora_weights(lora)
    wrapped = set(map(id, _check_layers(family, pipe, exported)))
    wrapped = [n for n, m in getattr(exported, family.denoiser).named_modules() if id(m) in wrapped]
    for target in family.targets:  # attention and the rest: all on integer layers
        assert any(n == target or n.endswith("." + target) for n in wrapped), target
    float_move = _denoise(pipe, family) - float_before
    int_move = _denoise(exported, family) - int_before
    assert float_move.norm() > 0 and _cosine(int_move, float_move) > 0.9
    exported.unload_lora_weights()
    denoiser = getattr(exported, family.denoiser)
    assert not any(isinstance(m, BaseTunerLayer) for m in denoiser.modules())
    assert torch.equal(_denoise(exported, family), int_before)
