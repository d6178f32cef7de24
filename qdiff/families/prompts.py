"""Prompt conditions for text-conditioned families (Stable Diffusion; Wan, CogVideoX videos).

Data-free distillation still needs *conditions*: a prompt file (one prompt per line)
stands in for a dataset. A condition id is a line of that file. Each prompt is encoded
once, by the float text encoder under no_grad, the first time a trajectory draws it, and
kept; the null condition is the empty prompt, as in the pipelines' own classifier-free
guidance (their default negative prompt).
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch
from diffusers import DiffusionPipeline

from qdiff.config import ConfigError, ModelConfig

from .base import FamilyAdapter

NULL_PROMPT = -1  # the condition id of the empty prompt


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


class PromptFamily(FamilyAdapter):
    """A family whose context is text-encoder embeddings of prompts from a file."""

    def __init__(self, pipe: DiffusionPipeline, prompts: Optional[Sequence[str]] = None) -> None:
        super().__init__(pipe)
        self.prompts = list(prompts) if prompts is not None else None
        self._embeddings: dict[int, torch.Tensor] = {}

    @classmethod
    def from_model_config(cls, pipe: DiffusionPipeline, model_cfg: ModelConfig) -> "PromptFamily":
        return cls(pipe, read_prompts(model_cfg.prompts) if model_cfg.prompts else None)

    @abstractmethod
    def _encode(self, text: str) -> torch.Tensor:
        """(tokens, dim) embedding of one prompt by the pipeline's text encoder."""

    def _prompt_list(self) -> list[str]:
        if not self.prompts:
            raise ConfigError(f"{self.name} is distilled from prompts: set model.prompts to a "
                              f"text file with one prompt per line, e.g. "
                              f"model.prompts=configs/prompts/coco-captions-sample.txt.")
        return self.prompts

    @property
    def num_conditions(self) -> int:
        return len(self._prompt_list())

    @torch.no_grad()
    def _embedding(self, index: int) -> torch.Tensor:
        """The embedding of prompt `index` (NULL_PROMPT: the empty prompt), cached in float32."""
        if index not in self._embeddings:
            text = "" if index == NULL_PROMPT else self._prompt_list()[index]
            self._embeddings[index] = self._encode(text).float()
        return self._embeddings[index]

    def context(self, conditions: torch.Tensor, guidance: float) -> torch.Tensor:
        indices = conditions.reshape(-1).tolist()
        if guidance > 1.0:
            indices = indices + [NULL_PROMPT] * len(indices)
        return torch.stack([self._embedding(index) for index in indices])


class VideoPromptFamily(PromptFamily):
    """A prompt family whose trajectories are videos of `model.video_size` (frames, height,
    width in pixels), or of the model's own default size."""

    text_tokens: ClassVar[int] = 226  # prompts are padded to the length the pipeline samples with

    def __init__(self, pipe: DiffusionPipeline, prompts: Optional[Sequence[str]] = None,
                 video_size: Optional[Sequence[int]] = None) -> None:
        super().__init__(pipe, prompts)
        self.num_frames, self.height, self.width = video_size or self.default_video_size()

    @classmethod
    def from_model_config(cls, pipe: DiffusionPipeline, model_cfg: ModelConfig) -> "VideoPromptFamily":
        prompts = read_prompts(model_cfg.prompts) if model_cfg.prompts else None
        return cls(pipe, prompts, model_cfg.video_size)

    @abstractmethod
    def default_video_size(self) -> tuple[int, int, int]:
        """(frames, height, width) the model was trained for."""

    def _encode(self, text: str) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(prompt=text, do_classifier_free_guidance=False,
                                            max_sequence_length=self.text_tokens,
                                            device=self.pipe._execution_device)
        return embeds[0]
