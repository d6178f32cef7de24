"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`: MMDiT `SD3Transformer2DModel`, CLIP and
T5 text encoders, flow matching)."""

from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("sd3")
class StableDiffusion3(Family):
    pipelines = ("StableDiffusion3Pipeline",)
    # patch and text embeddings, time/text embedder, final norm and projection
    eight_bit_layers = ("pos_embed.proj", "context_embedder", "time_text_embed.*", "norm_out.*",
                        "proj_out")
    default_steps, default_guidance = 28, 3.5
