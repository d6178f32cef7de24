"""The family adapter: everything distillation needs to know about one kind of pipeline.

Calibration, the distillation loop and the sample grids never call a pipeline directly.
They ask its adapter for:

- the conditions a trajectory draws: integer ids 0..num_conditions-1 (class ids, or rows
  of a prompt table), so that seeding, resuming and sharding over processes work the same
  way for every family (`qdiff.distill.batches`);
- the denoiser's context for a batch of ids, with the null condition as a second half
  when classifier-free guidance is on (a class embedding, prompt embeddings, class ids);
- the guided noise prediction of *any* denoiser -- the teacher or a quantized student --
  at (x_t, t, context), cast to the denoiser's dtype on the way in and to float32 on the
  way out, so a bf16 teacher and a float32 student answer in the same units;
- initial latents, the sampler a trajectory walks (`qdiff.families.samplers`: DDIM for
  noise and v predictions, Euler for flow matching), decoding (and so images for the
  sample grids), and the layers the family keeps at 8 bit.

A family is one file under `qdiff/families/`; video families add their own latents
(B, C, F, H, W), sampler and decoding (a video's frames side by side) by overriding the
same methods.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import ClassVar, Optional, Union

import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from qdiff.config import LayerOverride, ModelConfig, QuantConfig
from qdiff.guidance import combine_branches

from .samplers import DDIMSampler, TrajectorySampler

Generator = Union[torch.Generator, list[torch.Generator], None]


def compute_dtype(denoiser: nn.Module) -> torch.dtype:
    """The dtype of a denoiser's first float parameter (works through DDP wrappers too)."""
    return next((p.dtype for p in denoiser.parameters() if p.is_floating_point()), torch.float32)


def cast_context(context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Float contexts follow the denoiser's dtype; integer ones (class ids) stay as they are."""
    return context.to(dtype) if context.is_floating_point() else context


class FamilyAdapter(ABC):
    """One pipeline family, seen from distillation. Subclasses fill the abstract parts."""

    name: ClassVar[str]
    denoiser_name: ClassVar[str] = "unet"  # the pipeline component that is quantized
    eight_bit_layers: ClassVar[tuple[str, ...]] = ()  # fnmatch patterns kept at W8A8

    def __init__(self, pipe: DiffusionPipeline) -> None:
        self.pipe = pipe

    @classmethod
    def from_model_config(cls, pipe: DiffusionPipeline, model_cfg: ModelConfig) -> "FamilyAdapter":
        """The adapter of `pipe` with what `model_cfg` says about conditions (prompts, sizes)."""
        return cls(pipe)

    @classmethod
    @abstractmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        """Whether `pipe` is of this family (used by model.family=auto)."""

    @property
    @abstractmethod
    def num_conditions(self) -> int:
        """Trajectories draw their condition ids from 0..num_conditions-1."""

    @abstractmethod
    def context(self, conditions: torch.Tensor, guidance: float) -> torch.Tensor:
        """The denoiser's conditioning; with guidance > 1 the null condition follows as a
        second half of the batch."""

    @abstractmethod
    def _predict(self, denoiser: nn.Module, model_input: torch.Tensor, timesteps: torch.Tensor,
                 context: torch.Tensor) -> torch.Tensor:
        """The denoiser's noise prediction (for learned-sigma models, the noise half only)."""

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.components[self.denoiser_name]

    def preview_conditions(self) -> torch.Tensor:
        """The condition ids of one row of a sample grid."""
        return torch.arange(min(self.num_conditions, 10))

    def quant_config(self, cfg: QuantConfig) -> QuantConfig:
        """`cfg`, with this family's 8-bit layers after its own overrides when it asks for them
        (quant.family_overrides); the user's patterns come first, so they win."""
        if not cfg.family_overrides:
            return cfg
        defaults = [LayerOverride(pattern, 8, 8) for pattern in self.eight_bit_layers]
        return dataclasses.replace(cfg, overrides=[*cfg.overrides, *defaults])

    def trajectory_scheduler(self, steps: int) -> DDIMScheduler:
        """A fresh DDIM scheduler (from the pipeline's training schedule) set to `steps`."""
        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    def trajectory_sampler(self, steps: int) -> TrajectorySampler:
        """A fresh `steps`-step walk: DDIM on `trajectory_scheduler` unless a family overrides."""
        return DDIMSampler(self.trajectory_scheduler(steps))

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        config = self.denoiser.config
        return (batch_size, config.in_channels, config.sample_size, config.sample_size)

    def prepare_latents(self, batch_size: int, generator: Generator) -> torch.Tensor:
        """Initial noise; a list of generators gives each sample its own stream."""
        latents = randn_tensor(self.latent_shape(batch_size), generator=generator,
                               device=self.pipe._execution_device, dtype=torch.float32)
        # flow-matching schedulers start at unit noise and have no init_noise_sigma
        return latents * getattr(self.pipe.scheduler, "init_noise_sigma", 1.0)

    def guided_noise(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                     guidance: float, denoiser: Optional[nn.Module] = None) -> torch.Tensor:
        """The CFG-combined prediction eps_u + s (eps_c - eps_u) of `denoiser` (default: the
        teacher), in float32. The timestep goes in once per sample, so per-timestep
        quantizers can read it."""
        return combine_branches(self.branch_noise(latents, timestep, context, guidance, denoiser),
                                guidance)

    def branch_noise(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                     guidance: float, denoiser: Optional[nn.Module] = None) -> torch.Tensor:
        """The predictions guidance combines, in float32 (so is the combination, also for a
        bf16 teacher): the conditional half, then the null half when guided (`guidance` > 1)."""
        denoiser = denoiser or self.denoiser
        dtype = compute_dtype(denoiser)
        latents = latents.to(dtype)
        model_input = torch.cat([latents, latents]) if guidance > 1.0 else latents
        timesteps = timestep.reshape(-1).to(latents.device).expand(model_input.shape[0])
        return self._predict(denoiser, model_input, timesteps, cast_context(context, dtype)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (N, C, H, W) in [0, 1] (a VQ decoder snaps to its codebook)."""
        vae = self.pipe.vae
        images = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def sample_images(self, denoiser: nn.Module, conditions: torch.Tensor, guidance: float,
                      steps: int, generator: torch.Generator,
                      batch_size: Optional[int] = None) -> torch.Tensor:
        """Images (N, C, H, W) in [0, 1] of `conditions`, sampled with `denoiser` by this
        family's deterministic sampler (eta 0) through the adapter -- so a bf16 teacher and a
        float32 student sample alike, which a pipeline's own __call__ (one dtype for all)
        would not. `batch_size` bounds the samples that go through the denoiser and the
        decoder at once; the noise is drawn for all of them first, so the images are the same."""
        latents = self.prepare_latents(len(conditions), generator)
        size = batch_size or len(conditions)
        return torch.cat([self._sample_batch(denoiser, conditions[start:start + size],
                                             latents[start:start + size], guidance, steps)
                          for start in range(0, len(conditions), size)])

    def _sample_batch(self, denoiser: nn.Module, conditions: torch.Tensor, latents: torch.Tensor,
                      guidance: float, steps: int) -> torch.Tensor:
        sampler = self.trajectory_sampler(steps)  # fresh: a scheduler counts its steps
        context = self.context(conditions, guidance)
        for timestep in sampler.timesteps:
            model_input = sampler.model_input(latents, timestep)
            output = self.guided_noise(model_input, timestep, context, guidance, denoiser)
            latents = sampler.step(output, timestep, latents, eta=0.0, generator=None)
        return self.decode(latents)

    def cast_teacher(self, dtype: torch.dtype) -> None:
        """Run the teacher's denoiser in `dtype` (bf16/fp16 halve its memory); the other
        components (text encoder, autoencoder) stay as they are."""
        self.denoiser.to(dtype)
