"""CogVideoX text to video (`CogVideoXPipeline`: T5 text encoder, CogVideoX transformer).

Conditions are prompts (`qdiff.families.prompts`). CogVideoX predicts v on a DDIM
schedule with zero terminal SNR (`CogVideoXDDIMScheduler`), which the trajectory walks
whatever sampler the pipeline ships (the 5B model ships a DPM variant). Latents are
(B, (F - 1) / 4 + 1, 16, H / 8, W / 8), frames before channels; with
`use_rotary_positional_embeddings` (5B) the pipeline's 3-D rotary embedding of that grid
goes into every call. The videos' size comes from `model.video_size`, else 49 frames at
the transformer's sample size (480x720).
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel, DiffusionPipeline
from torch import nn

from .class_wan import frames_side_by_side
from .prompts import VideoPromptFamily


class CogVideoXFamily(VideoPromptFamily):
    """Prompt embeddings as the CogVideoX transformer's text tokens; v-prediction DDIM."""

    name = "cogvideox"
    denoiser_name = "transformer"
    # patch embedding (video and text projections), time embedding, final norm and projection
    eight_bit_layers = ("patch_embed.*", "time_embedding.*", "norm_out.*", "proj_out")

    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        components = pipe.components
        return (isinstance(components.get("transformer"), CogVideoXTransformer3DModel)
                and components.get("text_encoder") is not None)

    def default_video_size(self) -> tuple[int, int, int]:
        """49 frames at the transformer's sample size (480x720 for 2B and 5B)."""
        config, spatial = self.pipe.transformer.config, self.pipe.vae_scale_factor_spatial
        return 49, config.sample_height * spatial, config.sample_width * spatial

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        spatial, temporal = self.pipe.vae_scale_factor_spatial, self.pipe.vae_scale_factor_temporal
        return (batch_size, (self.num_frames - 1) // temporal + 1, self.denoiser.config.in_channels,
                self.height // spatial, self.width // spatial)

    def trajectory_scheduler(self, steps: int) -> CogVideoXDDIMScheduler:
        scheduler = CogVideoXDDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    def _rotary(self, model_input: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if not self.pipe.transformer.config.use_rotary_positional_embeddings:
            return None
        return self.pipe._prepare_rotary_positional_embeddings(self.height, self.width,
                                                               model_input.shape[1], model_input.device)

    def _predict(self, denoiser: nn.Module, model_input, timesteps, context) -> torch.Tensor:
        return denoiser(hidden_states=model_input, encoder_hidden_states=context, timestep=timesteps,
                        image_rotary_emb=self._rotary(model_input), return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> the videos' frames side by side, (N, 3, H, F * W) in [0, 1]."""
        videos = self.pipe.decode_latents(latents.to(self.pipe.vae.dtype))  # (N, C, F, H, W)
        return frames_side_by_side(videos.float() / 2 + 0.5).clamp(0, 1)
