"""FLUX.2 (`Flux2Pipeline`, `Flux2Transformer2DModel`, a Mistral-3 text encoder); guidance-
distilled like FLUX.1-dev: one denoiser call per step."""

from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("flux2")
class Flux2(Family):
    pipelines = ("Flux2Pipeline",)
    eight_bit_layers = ("x_embedder", "context_embedder", "time_guidance_embed.*", "norm_out.*",
                        "proj_out")
    default_steps, default_guidance = 50, 4.0
