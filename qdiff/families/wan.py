"""Wan text to video (`WanPipeline`): Wan 2.1, and Wan 2.2's two-expert A14B and TI2V-5B.

Wan 2.2 A14B has two denoisers, `transformer` for the high-noise steps and `transformer_2`
below the pipeline's `boundary_ratio`; each gets a student, which learns on the steps its
expert serves. TI2V-5B (`expand_timesteps`) passes a timestep per latent token.
"""

from qdiff.families.class_wan import WAN_EIGHT_BIT
from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("wan")
class Wan(Family):
    pipelines = ("WanPipeline",)
    video = True
    eight_bit_layers = WAN_EIGHT_BIT
    default_steps, default_guidance = 50, 5.0
