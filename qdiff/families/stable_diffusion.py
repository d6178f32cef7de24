"""Stable Diffusion v1.x / v2.x (`UNet2DConditionModel` + CLIP text encoder), text to image.

Conditions are the lines of a prompt file (`qdiff.families.prompts`). v-prediction
checkpoints (SD 2.x 768) need nothing special: teacher and student predict the same
quantity and the DDIM scheduler reads `prediction_type`.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from torch import nn

from .prompts import PromptFamily


class StableDiffusionFamily(PromptFamily):
    """Prompt embeddings (computed once per prompt) as the UNet's cross-attention context."""

    name = "sd"
    denoiser_name = "unet"
    eight_bit_layers = ("time_embedding.*", "conv_in", "conv_out")

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        components = pipe.components
        return (isinstance(components.get("unet"), UNet2DConditionModel)
                and components.get("text_encoder") is not None
                and components.get("tokenizer") is not None)

    def _encode(self, text: str) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(text, self.pipe._execution_device, 1,
                                            do_classifier_free_guidance=False)
        return embeds[0]

    def _predict(self, denoiser: nn.Module, model_input, timesteps, context) -> torch.Tensor:
        return denoiser(model_input, timesteps, encoder_hidden_states=context).sample
