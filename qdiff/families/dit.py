"""DiT (`DiTTransformer2DModel` in diffusers' `DiTPipeline`): class ids go in as such.

DiT-XL/2 predicts noise *and* a variance: out_channels = 2 x in_channels. DDIM needs only
the noise, so the adapter splits the output and everything downstream (guidance, the
distillation loss, the trajectory) sees the noise half alone; the variance half of the
student is not trained. The null class is 1000 (`num_embeds_ada_norm`), as DiTPipeline's.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel
from torch import nn

from .base import FamilyAdapter


class DiTFamily(FamilyAdapter):
    """Class-conditional DiT: the context is the class ids (null class appended for CFG)."""

    name = "dit"
    denoiser_name = "transformer"
    # patch embedding (first), final adaLN + projection (last), timestep embedder
    eight_bit_layers = ("pos_embed.proj", "proj_out_1", "proj_out_2", "*.emb.timestep_embedder.*")

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe.components.get("transformer"), DiTTransformer2DModel)

    @property
    def num_conditions(self) -> int:
        return self.denoiser.config.num_embeds_ada_norm

    def preview_conditions(self) -> torch.Tensor:
        """Ten classes spread over the label range (ImageNet: 0, 100, ..., 900)."""
        return torch.arange(10) * max(self.num_conditions // 10, 1) % self.num_conditions

    def context(self, conditions: torch.Tensor, guidance: float) -> torch.Tensor:
        labels = conditions.reshape(-1).to(self.pipe._execution_device)
        if guidance > 1.0:
            labels = torch.cat([labels, torch.full_like(labels, self.num_conditions)])
        return labels

    def _predict(self, denoiser: nn.Module, model_input, timesteps, context) -> torch.Tensor:
        output = denoiser(model_input, timestep=timesteps, class_labels=context).sample
        channels = model_input.shape[1]
        if output.shape[1] == 2 * channels:  # learned sigma: keep the noise half
            output = output[:, :channels]
        return output
