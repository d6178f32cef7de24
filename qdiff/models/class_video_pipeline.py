"""Class-conditional video generation with a Wan transformer, as a diffusers pipeline.

    class id -> ClassEmbedder -> (N, 1, D) encoder_hidden_states -> WanTransformer3DModel
    noise (N, C, F, H, W) -> flow matching (Euler) with classifier-free guidance -> frames

The embedded video teacher (`assets/tiny-wan-digits`) works in pixel space: the transformer
denoises the frames themselves, so there is no autoencoder. Where WanPipeline takes T5
prompt embeddings, this one takes a learned class embedding (the null class for guidance),
so nothing but the pipeline folder is needed. Load it with `qdiff.load_pipeline(path)`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from qdiff.guidance import combine_branches
from qdiff.models.class_embedder import ClassEmbedder

Generator = Optional[Union[torch.Generator, list[torch.Generator]]]


class ClassConditionalVideoPipeline(DiffusionPipeline):
    """Generate short videos of given classes with a class-conditional Wan transformer.

    Components: `transformer` (WanTransformer3DModel; its text_dim is the class embedding's
    width), `class_embedder` (ClassEmbedder), `scheduler` (FlowMatchEulerDiscreteScheduler).
    `num_frames`, `height` and `width` are the size of the videos it was trained on.
    """

    model_cpu_offload_seq = "class_embedder->transformer"

    def __init__(self, transformer: WanTransformer3DModel, class_embedder: ClassEmbedder,
                 scheduler: FlowMatchEulerDiscreteScheduler, num_frames: int = 8,
                 height: int = 16, width: int = 16):
        super().__init__()
        self.register_modules(transformer=transformer, class_embedder=class_embedder,
                              scheduler=scheduler)
        self.register_to_config(num_frames=num_frames, height=height, width=width)

    def class_context(self, class_labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """encoder_hidden_states (N, 1, D); with guidance the null class follows as a second half."""
        if guidance_scale > 1.0:
            null = torch.full_like(class_labels, self.class_embedder.null_class)
            class_labels = torch.cat([class_labels, null])
        return self.class_embedder(class_labels).to(self.transformer.dtype)

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        config = self.config
        return (batch_size, self.transformer.config.in_channels, config.num_frames, config.height,
                config.width)

    def prepare_latents(self, batch_size: int, generator: Generator,
                        latents: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unit Gaussian noise (N, C, F, H, W) in float32: flow matching starts at sigma = 1."""
        shape = self.latent_shape(batch_size)
        if latents is None:
            return randn_tensor(shape, generator=generator, device=self._execution_device,
                                dtype=torch.float32)
        if latents.shape != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        return latents.float()

    def guided_velocity(self, latents: torch.Tensor, timestep: torch.Tensor,
                        context: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """The CFG-combined velocity v_u + s (v_c - v_u) at one timestep, in float32."""
        model_input = torch.cat([latents, latents]) if guidance_scale > 1.0 else latents
        timesteps = timestep.reshape(-1).to(latents.device).expand(model_input.shape[0])
        velocity = self.transformer(model_input.to(self.transformer.dtype), timesteps,
                                    encoder_hidden_states=context, return_dict=False)[0].float()
        return combine_branches(velocity, guidance_scale)

    @staticmethod
    def frames(latents: torch.Tensor) -> torch.Tensor:
        """Pixel-space latents (N, C, F, H, W) in [-1, 1] -> frames (N, F, C, H, W) in [0, 1]."""
        return (latents.float().transpose(1, 2) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(self, class_labels: Union[int, Sequence[int], torch.Tensor],
                 guidance_scale: float = 4.5, num_inference_steps: int = 20,
                 generator: Generator = None, latents: Optional[torch.Tensor] = None,
                 output_type: str = "np", return_dict: bool = True):
        """Videos of `class_labels` after `num_inference_steps` Euler steps.

        `output_type`: "np" (N, F, H, W, C) floats in [0, 1], as diffusers' video pipelines;
        "pt" (N, F, C, H, W) tensor in [0, 1]; "pil" a list of frame lists; "latent" the
        latents (N, C, F, H, W) as they are.

        Args:
            class_labels: One class id, or one per video.
            guidance_scale: Classifier-free guidance scale; 1 samples without the null class.
            num_inference_steps: The number of Euler steps.
            generator: The noise's generator, or one per video.
            latents: Starting latents instead of drawn noise.
            output_type: "np", "pt", "pil" or "latent".
            return_dict: Return a pipeline output with `frames` rather than a tuple.

        Returns:
            The videos in `output_type`, as an output's `frames` or as `(frames,)`.

        Raises:
            ValueError: `output_type` is not one of the four above.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt', 'pil' or 'latent', got "
                             f"'{output_type}'.")
        labels = torch.as_tensor(class_labels, device=self._execution_device).reshape(-1)
        context = self.class_context(labels, guidance_scale)
        latents = self.prepare_latents(len(labels), generator, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            velocity = self.guided_velocity(latents, t, context, guidance_scale)
            latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return (latents,) if not return_dict else WanPipelineOutput(frames=latents)
        videos = self.frames(latents)
        if output_type != "pt":
            videos = videos.permute(0, 1, 3, 4, 2).cpu().numpy()
        if output_type == "pil":
            videos = [self.numpy_to_pil(video) for video in videos]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (videos,)
        return WanPipelineOutput(frames=videos)
