"""CogVideoX text to video (`CogVideoXPipeline`: T5 text encoder, CogVideoX transformer)."""

from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("cogvideox")
class CogVideoX(Family):
    pipelines = ("CogVideoXPipeline",)
    video = True
    # patch embedding (video and text projections), time embedding, final norm and projection
    eight_bit_layers = ("patch_embed.*", "time_embedding.*", "norm_out.*", "proj_out")
    default_steps, default_guidance = 50, 6.0
