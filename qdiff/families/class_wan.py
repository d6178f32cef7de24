"""Class-conditional Wan (qdiff's `ClassConditionalVideoPipeline`, the embedded video teacher).

The transformer is diffusers' `WanTransformer3DModel`; where Wan reads T5 prompt
embeddings, this pipeline feeds one learned class token (`ClassEmbedder`, null class for
guidance). Wan is trained by flow matching and predicts the velocity noise - x0, so the
trajectory is the pipeline's own Euler walk over its sigmas (`FlowMatchSampler`) and the
loss compares guided velocities. Latents are pixel-space videos (B, C, F, H, W); the sample
grids show each video's frames side by side.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from torch import nn

from qdiff.models.class_video_pipeline import ClassConditionalVideoPipeline

from .base import FamilyAdapter, Generator
from .samplers import FlowMatchSampler

# Wan's patch embedding (first layer), its time and condition embedders, the final projection
WAN_EIGHT_BIT = ("patch_embedding", "condition_embedder.*", "proj_out")


def frames_side_by_side(videos: torch.Tensor) -> torch.Tensor:
    """Videos (N, C, F, H, W) -> images (N, C, H, F * W), frame 0 on the left."""
    n, channels, frames, height, width = videos.shape
    return videos.permute(0, 1, 3, 2, 4).reshape(n, channels, height, frames * width)


class WanDenoising:
    """What every Wan family shares: the transformer, its 8-bit layers, its velocity
    prediction and the Euler walk over the pipeline scheduler's sigmas (a mixin before
    the adapter base class)."""

    denoiser_name = "transformer"
    eight_bit_layers = WAN_EIGHT_BIT

    def trajectory_sampler(self, steps: int) -> FlowMatchSampler:
        return FlowMatchSampler.walk_of(self.pipe.scheduler, steps)

    def _predict(self, denoiser: nn.Module, model_input, timesteps, context) -> torch.Tensor:
        return denoiser(model_input, timesteps, encoder_hidden_states=context, return_dict=False)[0]


class ClassWanFamily(WanDenoising, FamilyAdapter):
    """Class id -> ClassEmbedder -> encoder_hidden_states of a WanTransformer3DModel."""

    name = "class-wan"

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        return isinstance(pipe, ClassConditionalVideoPipeline)

    @property
    def num_conditions(self) -> int:
        return self.pipe.class_embedder.null_class  # classes 0..n-1; n is the null class

    def context(self, conditions: torch.Tensor, guidance: float) -> torch.Tensor:
        return self.pipe.class_context(conditions.to(self.pipe._execution_device), guidance)

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        return self.pipe.latent_shape(batch_size)

    def prepare_latents(self, batch_size: int, generator: Generator) -> torch.Tensor:
        return self.pipe.prepare_latents(batch_size, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixel-space videos in [-1, 1] -> their frames side by side in [0, 1]."""
        return frames_side_by_side(latents.float() / 2 + 0.5).clamp(0, 1)
