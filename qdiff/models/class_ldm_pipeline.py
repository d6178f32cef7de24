"""Class-conditional latent diffusion, the LDM-4 ImageNet way, as a diffusers pipeline.

    class id -> ClassEmbedder -> (N, 1, D) context -> UNet2DConditionModel cross-attention
    noise -> DDIM with classifier-free guidance (null class) -> latents -> VQ-f4 decoder

diffusers has no pipeline of this shape (DiTPipeline passes `class_labels` to a DiT, and
LDMPipeline is unconditional), so qdiff defines it. Load it with `qdiff.load_pipeline(path)`
or `ClassConditionalLDMPipeline.from_pretrained(path)`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, VQModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from qdiff.guidance import combine_branches
from qdiff.models.class_embedder import ClassEmbedder


class ClassConditionalLDMPipeline(DiffusionPipeline):
    """Generate images of given classes with a class-conditional latent diffusion model.

    Components: `unet` (UNet2DConditionModel, cross-attention on the class embedding),
    `class_embedder` (ClassEmbedder), `vae` (VQModel or AutoencoderKL), `scheduler` (DDIM).
    """

    model_cpu_offload_seq = "class_embedder->unet->vae"

    def __init__(self, unet: UNet2DConditionModel, class_embedder: ClassEmbedder,
                 vae: Union[VQModel, AutoencoderKL], scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, class_embedder=class_embedder, vae=vae,
                              scheduler=scheduler)

    def class_context(self, class_labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """Cross-attention context; with guidance the null class follows as a second half."""
        if guidance_scale > 1.0:
            null = torch.full_like(class_labels, self.class_embedder.null_class)
            class_labels = torch.cat([class_labels, null])
        return self.class_embedder(class_labels).to(self.unet.dtype)

    def guided_noise(self, latents: torch.Tensor, timestep: torch.Tensor,
                     context: torch.Tensor, guidance_scale: float,
                     denoiser: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """The CFG-combined noise prediction eps_u + s (eps_c - eps_u) at one timestep.

        `denoiser` defaults to the pipeline's UNet; distillation passes a student here.
        The timestep goes in once per sample, so per-timestep quantizers can read it.
        """
        denoiser = denoiser or self.unet
        model_input = torch.cat([latents, latents]) if guidance_scale > 1.0 else latents
        timesteps = timestep.reshape(-1).to(latents.device).expand(model_input.shape[0])
        noise = denoiser(model_input, timesteps, encoder_hidden_states=context).sample
        return combine_branches(noise, guidance_scale)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], shape (N, C, H, W); a VQ decoder snaps to its codebook."""
        latents = latents / self.vae.config.scaling_factor
        images = self.vae.decode(latents.to(self.vae.dtype)).sample
        return (images / 2 + 0.5).clamp(0, 1)

    def prepare_latents(self, batch_size: int, generator, latents: Optional[torch.Tensor]):
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self._execution_device,
                                   dtype=self.unet.dtype)
        elif latents.shape != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def __call__(self, class_labels: Union[int, Sequence[int], torch.Tensor],
                 guidance_scale: float = 2.0, num_inference_steps: int = 20, eta: float = 0.0,
                 generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
                 latents: Optional[torch.Tensor] = None, output_type: str = "pil",
                 return_dict: bool = True):
        """Images of `class_labels` after `num_inference_steps` DDIM steps.

        `output_type`: "pil" (list of PIL images), "np" (N, H, W, C) floats in [0, 1],
        "pt" (N, C, H, W) tensor in [0, 1], or "latent" (the latents, not decoded).

        Args:
            class_labels: One class id, or one per image.
            guidance_scale: Classifier-free guidance scale; 1 samples without the null class.
            num_inference_steps: The number of DDIM steps.
            eta: DDIM's eta (0 is deterministic).
            generator: The noise's generator, or one per image.
            latents: Starting latents instead of drawn noise.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: Return an `ImagePipelineOutput` rather than a tuple.

        Returns:
            An `ImagePipelineOutput` whose `images` are in `output_type`, or `(images,)`.

        Raises:
            ValueError: `output_type` is not one of the four above.
        """
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got "
                             f"'{output_type}'.")
        labels = torch.as_tensor(class_labels, device=self._execution_device).reshape(-1)
        context = self.class_context(labels, guidance_scale)
        latents = self.prepare_latents(len(labels), generator, latents)

        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t)
            noise = self.guided_noise(model_input, t, context, guidance_scale)
            latents = self.scheduler.step(noise, t, latents, eta=eta,
                                          generator=generator).prev_sample

        if output_type == "latent":
            self.maybe_free_model_hooks()
            return (latents,) if not return_dict else ImagePipelineOutput(images=latents)
        images = self.decode_latents(latents)
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
