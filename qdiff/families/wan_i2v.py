"""Wan image to video (`WanImageToVideoPipeline`): Wan 2.2 I2V-A14B (two experts, no image
encoder) and Wan 2.1 I2V. Each condition is a prompt and a first frame from `model.images`."""

from qdiff.families.class_wan import WAN_EIGHT_BIT
from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("wan-i2v")
class WanImageToVideo(Family):
    pipelines = ("WanImageToVideoPipeline",)
    video = True
    needs_image = True
    eight_bit_layers = WAN_EIGHT_BIT
    default_steps, default_guidance = 40, 3.5
