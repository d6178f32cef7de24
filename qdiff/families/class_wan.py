"""Class-conditional Wan (qdiff's `ClassConditionalVideoPipeline`, the embedded video teacher):
diffusers' `WanTransformer3DModel` on one learned class token, flow-matching Euler."""

from qdiff.families.family import Family
from qdiff.families.registry import register_family

# Wan's patch embedding (first layer), its time and condition embedders, the final projection
WAN_EIGHT_BIT = ("patch_embedding", "condition_embedder.*", "proj_out")


@register_family("class-wan")
class ClassWan(Family):
    pipelines = ("ClassConditionalVideoPipeline",)
    conditions = "classes"
    video = True
    eight_bit_layers = WAN_EIGHT_BIT
    default_steps, default_guidance = 20, 4.5

    def num_classes(self) -> int:
        return self.pipe.class_embedder.null_class  # classes 0..n-1; n is the null class
