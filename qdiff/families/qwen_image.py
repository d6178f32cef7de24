"""Qwen-Image (`QwenImagePipeline`: a Qwen2.5-VL text encoder, an MMDiT, flow matching).

Its classifier-free guidance is "true CFG": `true_cfg_scale` with a negative prompt, one
denoiser call per branch; the negative prompt is " ", as the model card samples with.
"""

from typing import Any

from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("qwen-image")
class QwenImage(Family):
    pipelines = ("QwenImagePipeline",)
    eight_bit_layers = ("img_in", "txt_in", "time_text_embed.*", "norm_out.*", "proj_out")
    default_steps, default_guidance = 50, 4.0

    def guidance_kwargs(self, guidance: float, count: int) -> dict[str, Any]:
        return {"true_cfg_scale": guidance, "negative_prompt": [" "] * count}
