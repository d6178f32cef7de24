"""Class-conditional latent diffusion (LDM-4 ImageNet, the embedded digits teacher).

The pipeline is qdiff's own `ClassConditionalLDMPipeline`; this adapter hands the loop
its class context, guided noise and latents unchanged, so distillation of this family is
exactly what it was before adapters existed (the resume and 2-process tests pin it).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from torch import nn

from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline

from .base import FamilyAdapter, Generator


class ClassLDMFamily(FamilyAdapter):
    """Class id -> ClassEmbedder -> cross-attention context of a UNet2DConditionModel."""

    name = "class-ldm"
    denoiser_name = "unet"
    # EfficientDM: time embedding, first and last layer at 8 bit
    eight_bit_layers = ("time_embedding.*", "conv_in", "conv_out")

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, ClassConditionalLDMPipeline)

    @property
    def num_conditions(self) -> int:
        return self.pipe.class_embedder.null_class  # classes 0..n-1; n is the null class

    def context(self, conditions: torch.Tensor, guidance: float) -> torch.Tensor:
        return self.pipe.class_context(conditions.to(self.pipe._execution_device), guidance)

    def prepare_latents(self, batch_size: int, generator: Generator) -> torch.Tensor:
        return self.pipe.prepare_latents(batch_size, generator, None)

    def _predict(self, denoiser: nn.Module, model_input, timesteps, context) -> torch.Tensor:
        return denoiser(model_input, timesteps, encoder_hidden_states=context).sample
