"""DiT (`DiTPipeline`, `DiTTransformer2DModel`): class ids go in as such.

DiT-XL/2 predicts noise *and* a variance (out_channels = 2 x in_channels); the pipeline
keeps the noise half for its scheduler, so that is what the student is trained to match.
"""

import torch

from qdiff.families.family import Family
from qdiff.families.registry import register_family


@register_family("dit")
class DiT(Family):
    pipelines = ("DiTPipeline",)
    conditions = "classes"
    # patch embedding (first), final adaLN + projection (last), timestep embedder
    eight_bit_layers = ("pos_embed.proj", "proj_out_1", "proj_out_2", "*.emb.timestep_embedder.*")
    default_steps, default_guidance = 50, 4.0

    def num_classes(self) -> int:
        return self.pipe.transformer.config.num_embeds_ada_norm

    def preview_conditions(self) -> torch.Tensor:
        """Ten classes spread over the label range (ImageNet: 0, 100, ..., 900)."""
        return torch.arange(10) * max(self.num_conditions // 10, 1) % self.num_conditions

    def prediction(self, component: str, output: torch.Tensor) -> torch.Tensor:
        channels = self.pipe.transformer.config.in_channels
        return output[:, :channels] if output.shape[1] == 2 * channels else output
