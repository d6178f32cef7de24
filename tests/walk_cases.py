"""The families of the pipeline-walk tests: a tiny pipeline, the kwargs `pipe(...)` is
called with (a batch of conditions, one generator per sample), and the number of
denoiser calls that makes (steps, twice that when guidance calls the model per branch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, UniPCMultistepScheduler, WanPipeline, \
    WanTransformer3DModel

from tiny_families import FLUX2_TEXT_LAYERS, PROMPTS, tiny_class_wan, tiny_cogvideox, tiny_dit, \
    tiny_flux, tiny_flux2, tiny_hunyuan_video15, tiny_image, tiny_ltx2, tiny_qwen_image, \
    tiny_stable_diffusion, tiny_stable_diffusion_3, tiny_stable_diffusion_xl, tiny_wan, \
    tiny_wan22_i2v, tiny_wan22_ti2v, tiny_wan22_ti2v_i2v

STEPS = 3
SEEDS = (11, 12)


def random_class_ldm():
    from qdiff.models.class_embedder import ClassEmbedder
    from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline
    from qdiff.models.zoo.train_autoencoder import build_vq_f4
    from qdiff.models.zoo.train_denoiser import CONTEXT_DIM, build_class_unet, build_ddim_scheduler

    torch.manual_seed(0)
    return ClassConditionalLDMPipeline(
        unet=build_class_unet().eval(), class_embedder=ClassEmbedder(10, CONTEXT_DIM).eval(),
        vae=build_vq_f4().eval(), scheduler=build_ddim_scheduler())


def tiny_wan_two_experts():
    """Wan 2.2 A14B's layout: `transformer` above the boundary timestep (0.8 x 1000),
    `transformer_2` (its own weights) below, each with its guidance scale."""
    pipe = tiny_wan()
    torch.manual_seed(1)
    low_noise = WanTransformer3DModel.from_config(pipe.transformer.config).eval()
    return WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                       scheduler=pipe.scheduler, transformer=pipe.transformer,
                       transformer_2=low_noise, boundary_ratio=0.8)


def with_scheduler(build: Callable[[], DiffusionPipeline], scheduler_class, **overrides):
    """`build`, its scheduler replaced by `scheduler_class` from the same config."""
    def built() -> DiffusionPipeline:
        pipe = build()
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)
        return pipe
    return built


@dataclass
class WalkCase:
    build: Callable[[], DiffusionPipeline]
    kwargs: dict  # without `generator`
    calls_per_step: int  # 2 when guidance calls the denoiser once per branch
    denoiser: str = "unet"
    also: tuple[str, ...] = ()  # further denoiser components the pipeline calls
    timestep_divisor: float = 1.0  # FLUX, FLUX.2, Qwen-Image pass the denoiser t / 1000

    @property
    def denoisers(self) -> set[str]:
        return {self.denoiser, *self.also}

    def pipe(self) -> DiffusionPipeline:
        pipe = self.build()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call_kwargs(self, seeds=SEEDS) -> dict[str, Any]:
        return {**self.kwargs, "num_inference_steps": STEPS,
                "generator": [torch.Generator().manual_seed(seed) for seed in seeds]}


VIDEO = dict(num_frames=5, height=16, width=16, output_type="pt")
CASES = {
    "class-ldm/ddim": WalkCase(random_class_ldm, dict(class_labels=[1, 7], guidance_scale=2.0,
                                                      output_type="pt"), 1),
    "sd/ddim": WalkCase(tiny_stable_diffusion, dict(prompt=PROMPTS[:2], guidance_scale=7.5,
                                                    output_type="pt"), 1),
    "sd/unipc": WalkCase(with_scheduler(tiny_stable_diffusion, UniPCMultistepScheduler),
                         dict(prompt=PROMPTS[:2], guidance_scale=7.5, output_type="pt"), 1),
    "sd/ddim-unguided": WalkCase(tiny_stable_diffusion, dict(prompt=PROMPTS[:2], guidance_scale=1.0,
                                                             output_type="pt"), 1),
    "dit/ddim": WalkCase(tiny_dit, dict(class_labels=[1, 7], guidance_scale=4.0,
                                        output_type="np"), 1, "transformer"),
    "class-wan/flow-euler": WalkCase(tiny_class_wan, dict(class_labels=[1, 7], guidance_scale=4.0,
                                                          output_type="pt"), 1, "transformer"),
    "wan/flow-euler": WalkCase(tiny_wan, dict(prompt=PROMPTS[:2], guidance_scale=5.0, **VIDEO), 2,
                               "transformer"),
    "wan/unipc-flow": WalkCase(with_scheduler(tiny_wan, UniPCMultistepScheduler,
                                              prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=3.0),
                               dict(prompt=PROMPTS[:2], guidance_scale=5.0, **VIDEO), 2, "transformer"),
    "wan2.2-two-experts/flow-euler": WalkCase(
        tiny_wan_two_experts, dict(prompt=PROMPTS[:2], guidance_scale=5.0, guidance_scale_2=3.0,
                                   **VIDEO), 2, "transformer", ("transformer_2",)),
    "cogvideox/ddim-v": WalkCase(tiny_cogvideox, dict(prompt=PROMPTS[:2], guidance_scale=6.0,
                                                      **VIDEO), 1, "transformer"),
    "sdxl/euler": WalkCase(tiny_stable_diffusion_xl, dict(prompt=PROMPTS[:2], guidance_scale=5.0,
                                                          output_type="pt"), 1),
    "sd3.5/flow-euler": WalkCase(tiny_stable_diffusion_3, dict(
        prompt=PROMPTS[:2], guidance_scale=4.5, height=8, width=8, max_sequence_length=8,
        output_type="pt"), 1, "transformer"),
    "flux.1-dev/flow-euler": WalkCase(tiny_flux, dict(  # guidance distilled: one call per step
        prompt=PROMPTS[:2], guidance_scale=3.5, height=8, width=8, max_sequence_length=8,
        output_type="pt"), 1, "transformer", timestep_divisor=1000.0),
    "qwen-image/flow-euler": WalkCase(tiny_qwen_image, dict(  # true CFG: a call per branch
        prompt=PROMPTS[:2], negative_prompt=[" "] * 2, true_cfg_scale=4.0, height=16, width=16,
        output_type="pt"), 2, "transformer", timestep_divisor=1000.0),
    "wan2.2-ti2v/unipc-flow": WalkCase(tiny_wan22_ti2v, dict(  # per-token timesteps (B, L)
        prompt=PROMPTS[:2], guidance_scale=5.0, num_frames=5, height=32, width=32,
        output_type="pt"), 2, "transformer"),
    "wan2.2-ti2v-i2v/unipc-flow": WalkCase(tiny_wan22_ti2v_i2v, dict(  # image tokens at t = 0
        image=tiny_image(32), prompt=PROMPTS[:2], guidance_scale=5.0, num_frames=5, height=32,
        width=32, output_type="pt"), 2, "transformer"),
    "wan2.2-i2v-a14b/unipc-flow": WalkCase(tiny_wan22_i2v, dict(
        image=tiny_image(), prompt=PROMPTS[:2], guidance_scale=5.0, guidance_scale_2=3.0, **VIDEO),
        2, "transformer", ("transformer_2",)),
    "flux.2-dev/flow-euler": WalkCase(tiny_flux2, dict(
        prompt=PROMPTS[:2], guidance_scale=4.0, height=8, width=8, max_sequence_length=40,
        text_encoder_out_layers=FLUX2_TEXT_LAYERS, output_type="pt"), 1, "transformer",
        timestep_divisor=1000.0),
    "hunyuanvideo1.5/flow-euler": WalkCase(tiny_hunyuan_video15, dict(  # the guider's CFG: a call
        prompt=PROMPTS[:2], **VIDEO), 2, "transformer"),                   # per branch
    "ltx-2/flow-euler": WalkCase(tiny_ltx2, dict(  # CFG batched, STG, modality isolation: 3 calls
        prompt=PROMPTS[:2], num_frames=5, height=32, width=32, max_sequence_length=16,
        spatio_temporal_guidance_blocks=[0], output_type="pt"), 3, "transformer"),
}
