"""Class-conditional latent diffusion (LDM-4 ImageNet, the embedded digits teacher), on qdiff's
own `ClassConditionalLDMPipeline` (DDIM, batched classifier-free guidance)."""

from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("class-ldm")
class ClassLDM(Family):
    pipelines = ("ClassConditionalLDMPipeline",)
    conditions = "classes"
    # EfficientDM: time embedding, first and last layer at 8 bit
    eight_bit_layers = ("time_embedding.*", "conv_in", "conv_out")
    default_steps, default_guidance = 20, 2.0

    def num_classes(self) -> int:
        return self.pipe.class_embedder.null_class  # classes 0..n-1; n is the null class
