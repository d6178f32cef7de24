"""Stable Diffusion v1.x / v2.x (`StableDiffusionPipeline`: CLIP text encoder, UNet).

v-prediction checkpoints (SD 2.x 768) need nothing special: teacher and student predict
the same quantity and the x0 weighting reads the scheduler's `prediction_type`.
"""

from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("sd")
class StableDiffusion(Family):
    pipelines = ("StableDiffusionPipeline",)
    eight_bit_layers = ("time_embedding.*", "conv_in", "conv_out")
    default_steps, default_guidance = 50, 7.5
