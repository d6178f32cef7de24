"""Stable Diffusion XL (`StableDiffusionXLPipeline`: two CLIP text encoders, a UNet with
text and size conditioning)."""

from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("sdxl")
class StableDiffusionXL(Family):
    pipelines = ("StableDiffusionXLPipeline",)
    # time and added (pooled text + size) embeddings, first and last layer
    eight_bit_layers = ("time_embedding.*", "add_embedding.*", "conv_in", "conv_out")
    default_steps, default_guidance = 50, 5.0
