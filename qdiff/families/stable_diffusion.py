"""Stable Diffusion v1.x / v2.x (`UNet2DConditionModel` + CLIP text encoder), text to image.

Data-free distillation still needs *conditions*: a prompt file (one prompt per line)
stands in for a dataset. A condition id is a line of that file. Each prompt is encoded
once, by the float text encoder under no_grad, the first time a trajectory draws it, and
kept; the null condition is the empty prompt, as in the pipeline's own classifier-free
guidance. v-prediction checkpoints (SD 2.x 768) need nothing special: teacher and
student predict the same quantity and the DDIM scheduler reads `prediction_type`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel
from torch import nn

from qdiff.config import ConfigError

from .base import FamilyAdapter


def read_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a prompt file (a line starting with '#' is a comment)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"model.prompts='{path}' is not a file. Give a text file with one "
                          f"prompt per line, for example configs/prompts/coco-captions-sample.txt.")
    prompts = [line.strip() for line in file.read_text().splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"model.prompts='{path}' holds no prompts; write one prompt per line.")
    return prompts


class StableDiffusionFamily(FamilyAdapter):
    """Prompt embeddings (computed once per prompt) as the UNet's cross-attention context."""

    name = "sd"
    denoiser_name = "unet"
    eight_bit_layers = ("time_embedding.*", "conv_in", "conv_out")

    def __init__(self, pipe: DiffusionPipeline, prompts: Optional[Sequence[str]] = None) -> None:
        super().__init__(pipe)
        self.prompts = list(prompts) if prompts is not None else None
        self._embeddings: dict[int, torch.Tensor] = {}

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        components = pipe.components
        return (isinstance(components.get("unet"), UNet2DConditionModel)
                and components.get("text_encoder") is not None
                and components.get("tokenizer") is not None)

    def _prompt_list(self) -> list[str]:
        if not self.prompts:
            raise ConfigError("Stable Diffusion is distilled from prompts: set model.prompts to a "
                              "text file with one prompt per line, e.g. "
                              "model.prompts=configs/prompts/coco-captions-sample.txt.")
        return self.prompts

    @property
    def num_conditions(self) -> int:
        return len(self._prompt_list())

    @torch.no_grad()
    def _embedding(self, index: int) -> torch.Tensor:
        """(tokens, dim) text embedding of prompt `index` (-1: the empty prompt), cached."""
        if index not in self._embeddings:
            text = "" if index < 0 else self._prompt_list()[index]
            embeds, _ = self.pipe.encode_prompt(text, self.pipe._execution_device, 1,
                                                do_classifier_free_guidance=False)
            self._embeddings[index] = embeds[0].float()
        return self._embeddings[index]

    def context(self, conditions: torch.Tensor, guidance: float) -> torch.Tensor:
        indices = conditions.reshape(-1).tolist()
        if guidance > 1.0:
            indices = indices + [-1] * len(indices)
        return torch.stack([self._embedding(index) for index in indices])

    def _predict(self, denoiser: nn.Module, model_input, timesteps, context) -> torch.Tensor:
        return denoiser(model_input, timesteps, encoder_hidden_states=context).sample
