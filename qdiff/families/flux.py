"""FLUX.1 (`FluxPipeline`, `FluxTransformer2DModel`). FLUX.1-dev is guidance-distilled: the
guidance scale is an input of the one denoiser call per step, not a second branch."""

from qdiff.families.family import Family
from qdiff.families.registry import register_family

# latent and text embeddings, time/guidance/text embedder, final norm and projection
FLUX_EIGHT_BIT = ("x_embedder", "context_embedder", "time_text_embed.*", "norm_out.*", "proj_out")


@register_family("flux")
class Flux(Family):
    pipelines = ("FluxPipeline",)
    eight_bit_layers = FLUX_EIGHT_BIT
    default_steps, default_guidance = 28, 3.5
