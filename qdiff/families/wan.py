"""Wan 2.1 text to video (`WanPipeline`: UMT5 text encoder, `WanTransformer3DModel`, Wan VAE).

Conditions are prompts (`qdiff.families.prompts`), zero-padded to the 512 tokens that
WanPipeline samples with (the padding is attended to). Wan is a flow-matching model that
predicts the velocity noise - x0; the teacher's trajectory is an Euler walk over the sigma
grid of the pipeline's own scheduler (FlowMatchEuler, or UniPC with flow sigmas as Wan 2.1
ships it: the walk visits its timesteps, with first-order steps). Latents are
(B, 16, (F - 1) / 4 + 1, H / 8, W / 8); the videos' size comes from `model.video_size`,
else Wan 2.1's 81 frames at 480x832. Wan 2.2's two-expert pipelines are not covered.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, WanTransformer3DModel

from .class_wan import WanDenoising, frames_side_by_side
from .prompts import VideoPromptFamily


class WanFamily(WanDenoising, VideoPromptFamily):
    """Prompt embeddings as the Wan transformer's encoder_hidden_states; flow matching."""

    name = "wan"
    text_tokens = 512

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        components = pipe.components
        return (isinstance(components.get("transformer"), WanTransformer3DModel)
                and components.get("text_encoder") is not None
                and components.get("transformer_2") is None)

    def default_video_size(self) -> tuple[int, int, int]:
        return 81, 480, 832

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        spatial, temporal = self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
        return (batch_size, self.denoiser.config.in_channels, (self.num_frames - 1) // temporal + 1,
                self.height // spatial, self.width // spatial)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> the videos' frames side by side, (N, 3, H, F * W) in [0, 1]."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device)
        videos = vae.decode((latents.float() * std + mean).to(vae.dtype), return_dict=False)[0]
        return frames_side_by_side(videos.float() / 2 + 0.5).clamp(0, 1)
