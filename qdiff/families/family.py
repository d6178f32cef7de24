"""A family is a declaration: what qdiff needs to know of one kind of diffusers pipeline.

The stock pipeline does the walking (conditioning, latents, its configured scheduler,
guidance, decoding); a family only says how to call it and what to quantize:

- which pipeline classes it serves (`pipelines`, or `matches` for a finer test); the
  denoiser components are the pipeline's own (`unet`, `transformer`, `transformer_2`);
- how a batch of condition ids and one generator per sample become the pipeline's call
  arguments (`condition_kwargs`: prompts or class labels; `guidance_kwargs`; sizes);
- its defaults (steps, guidance, output size) and the layers it keeps at 8 bit;
- how a pipeline's `output_type="pt"` output becomes images for grids and metrics.

A family is one file in this package, a `Family` subclass registered with
`@register_family`; nothing else is edited to add one (docs/extending/add-a-family.md).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from torch import nn

from qdiff.config import ConfigError, LayerOverride, ModelConfig, QuantConfig
from qdiff.walk import denoiser_components

from .conditions import read_images, read_prompts


def frames_side_by_side(videos: torch.Tensor) -> torch.Tensor:
    """Videos (N, F, C, H, W) -> images (N, C, H, F * W), frame 0 on the left.

    Args:
        videos: Videos of shape (N, F, C, H, W).

    Returns:
        Images of shape (N, C, H, F * W).
    """
    n, frames, channels, height, width = videos.shape
    return videos.permute(0, 2, 3, 1, 4).reshape(n, channels, height, frames * width)


class Family:
    """One kind of pipeline, declared. Subclasses set the class attributes and, where the
    pipeline's arguments differ from the common ones, override the `*_kwargs` methods.

    Args:
        pipe: The teacher pipeline the family serves.
        model_cfg: The run's `model` block: prompts, first-frame images, sample size and extra
            pipeline arguments. None takes the defaults (no prompts).

    Raises:
        ConfigError: `model_cfg.prompts` or `model_cfg.images` cannot be read.
    """

    name: ClassVar[str]
    pipelines: ClassVar[tuple[str, ...]] = ()  # pipeline class names this family serves
    conditions: ClassVar[str] = "prompts"  # "prompts" (a prompt file) or "classes" (class ids)
    video: ClassVar[bool] = False  # the pipeline returns videos (N, F, C, H, W)
    eight_bit_layers: ClassVar[tuple[str, ...]] = ()  # fnmatch patterns kept at W8A8
    default_steps: ClassVar[int] = 50
    default_guidance: ClassVar[float] = 5.0
    # (height, width) or (frames, height, width) of a sample; None: the pipeline's own default
    default_size: ClassVar[Optional[tuple[int, ...]]] = None
    needs_image: ClassVar[bool] = False  # image-to-video: a first frame per call (model.images)

    def __init__(self, pipe: DiffusionPipeline, model_cfg: Optional[ModelConfig] = None) -> None:
        self.pipe = pipe
        model_cfg = model_cfg or ModelConfig()
        self.prompts = read_prompts(model_cfg.prompts) if model_cfg.prompts else None
        self.images = read_images(model_cfg.images) if model_cfg.images else None
        self.size = self._size(model_cfg)
        self.extra_kwargs = dict(model_cfg.pipeline_kwargs)

    # -- what the family serves -------------------------------------------------------
    @classmethod
    def matches(cls, pipe: DiffusionPipeline) -> bool:
        """Whether `pipe` is of this family (model.family=auto picks the first that matches).

        Args:
            pipe: The pipeline to test.

        Returns:
            True when the pipeline's class is one this family declares.
        """
        return type(pipe).__name__ in cls.pipelines

    @property
    def denoisers(self) -> list[str]:
        """The pipeline's denoiser components, each of which gets a student."""
        return denoiser_components(self.pipe)

    def denoiser(self, component: Optional[str] = None) -> nn.Module:
        """The teacher's denoiser `component` (default: the first).

        Args:
            component: A name of `denoisers`, or None for the first.

        Returns:
            The teacher's denoiser module.
        """
        return getattr(self.pipe, component or self.denoisers[0])

    # -- conditions ----------------------------------------------------------------------
    @property
    def num_conditions(self) -> int:
        """Trajectories draw their condition ids from 0..num_conditions-1."""
        if self.conditions == "classes":
            return self.num_classes()
        return len(self._prompt_list())

    def num_classes(self) -> int:
        """The number of classes of a class-conditional family (its null class not counted).

        Returns:
            The number of classes.

        Raises:
            NotImplementedError: The family declares `conditions = "classes"` but does not
                override this method.
        """
        raise NotImplementedError(f"{self.name} declares conditions='classes' but no num_classes().")

    def preview_conditions(self) -> torch.Tensor:
        """The condition ids of one row of a sample grid.

        Returns:
            Up to ten condition ids.
        """
        return torch.arange(min(self.num_conditions, 10))

    def _prompt_list(self) -> list[str]:
        if not self.prompts:
            raise ConfigError(f"{self.name} is distilled from prompts: set model.prompts to a "
                              f"text file with one prompt per line, e.g. "
                              f"model.prompts=configs/prompts/coco-captions-sample.txt.")
        return self.prompts

    def condition_kwargs(self, ids: torch.Tensor) -> dict[str, Any]:
        """The pipeline arguments that carry the conditions `ids` (a prompt list by default).

        Args:
            ids: Condition ids (class ids, or indices into the prompt list).

        Returns:
            `{"class_labels": ...}`, or `{"prompt": [...]}` plus `image` for an image-to-video family.

        Raises:
            ConfigError: A prompt family has no prompts, or an image-to-video family no images.
        """
        if self.conditions == "classes":
            return {"class_labels": ids.reshape(-1).tolist()}
        prompts = self._prompt_list()
        kwargs: dict[str, Any] = {"prompt": [prompts[i] for i in ids.reshape(-1).tolist()]}
        if self.needs_image:
            if not self.images:
                raise ConfigError(f"{self.name} turns an image into a video: set model.images to "
                                  f"a folder of first frames (PNG or JPEG), one used per prompt.")
            # one first frame per call (image-to-video pipelines take one for the batch):
            # the first condition's; the trajectories' random ids vary it from call to call
            kwargs["image"] = self.images[int(ids.reshape(-1)[0]) % len(self.images)]
        return kwargs

    # -- the call ----------------------------------------------------------------------
    def guidance_kwargs(self, guidance: float, count: int) -> dict[str, Any]:
        """The pipeline arguments that set guidance to `guidance` for `count` samples.

        Args:
            guidance: The guidance scale.
            count: The number of samples of the call.

        Returns:
            The guidance arguments of the pipeline's `__call__`.
        """
        return {"guidance_scale": guidance}

    def size_kwargs(self) -> dict[str, Any]:
        """The pipeline arguments for the sample size (none: the pipeline's default).

        Returns:
            The size arguments (for example `height`, `width`, `num_frames`), or `{}`.
        """
        if self.size is None:
            return {}
        if len(self.size) == 3:
            frames, height, width = self.size
            return {"num_frames": frames, "height": height, "width": width}
        height, width = self.size
        return {"height": height, "width": width}

    def call_kwargs(self, ids: torch.Tensor, generators: Any, steps: int, guidance: float,
                    eta: float = 0.0, output_type: str = "latent") -> dict[str, Any]:
        """The arguments of one `pipe(...)` call: conditions `ids`, one generator per sample
        (or one for all), `steps` denoising steps of the configured scheduler.

        Args:
            ids: Condition ids, one per sample.
            generators: A `torch.Generator`, or a list of one per sample.
            steps: The number of denoising steps.
            guidance: The guidance scale.
            eta: DDIM's eta; passed only to pipelines that take it.
            output_type: The pipeline's `output_type`.

        Returns:
            The keyword arguments of `pipe(...)`.

        Raises:
            ConfigError: `eta` is not 0 but the pipeline takes no `eta`, or the conditions cannot
                be given (see `condition_kwargs`).
        """
        kwargs = {**self.condition_kwargs(ids), **self.guidance_kwargs(guidance, len(ids)),
                  **self.size_kwargs(), **self.extra_kwargs, "num_inference_steps": steps,
                  "generator": generators, "output_type": output_type}
        accepted = inspect.signature(type(self.pipe).__call__).parameters
        if "eta" in accepted:
            kwargs["eta"] = eta
        elif eta:
            raise ConfigError(f"distill.eta={eta}, but {type(self.pipe).__name__} samples "
                              f"deterministically (its __call__ takes no eta); set distill.eta=0.")
        return kwargs

    # -- outputs -----------------------------------------------------------------------
    def prediction(self, component: str, output: torch.Tensor) -> torch.Tensor:
        """The part of a denoiser's raw output the student is trained to match (all of it;
        a family whose model also predicts what its pipeline discards narrows it).

        Args:
            component: The denoiser component that produced `output`.
            output: The denoiser's raw output.

        Returns:
            The part of `output` the loss compares.
        """
        return output

    def to_images(self, output: Any) -> torch.Tensor:
        """A pipeline output of `output_type="pt"` -> images (N, C, H, W) in [0, 1]; a video's
        frames side by side.

        Args:
            output: The pipeline's output.

        Returns:
            Images (N, C, H, W) in [0, 1].
        """
        value = self.to_samples(output)
        return frames_side_by_side(value) if self.video else value

    def to_samples(self, output: Any) -> torch.Tensor:
        """A pipeline output of `output_type="pt"` -> images (N, C, H, W), or for a video
        family videos (N, F, C, H, W), as floats in [0, 1].

        Args:
            output: The pipeline's output.

        Returns:
            Images (N, C, H, W) or videos (N, F, C, H, W) in [0, 1].
        """
        value = output[0]
        if isinstance(value, np.ndarray):  # channels last, as "np" outputs are
            value = torch.from_numpy(value).movedim(-1, -3)
        elif isinstance(value, (list, tuple)):
            value = torch.stack([torch.as_tensor(item) for item in value])
        return value.float()

    # -- quantization ------------------------------------------------------------------
    @classmethod
    def quant_config(cls, cfg: QuantConfig) -> QuantConfig:
        """`cfg`, with this family's 8-bit layers after its own overrides when it asks for them
        (quant.family_overrides); the user's patterns come first, so they win. A classmethod:
        the memory count asks it without a pipeline (`FAMILIES[name].quant_config(cfg)`).

        Args:
            cfg: The run's `quant` block.

        Returns:
            A copy of `cfg` with the family's overrides appended, or `cfg` itself when it adds none.
        """
        if not cfg.family_overrides:
            return cfg
        defaults = [LayerOverride(pattern, 8, 8) for pattern in cls.eight_bit_layers]
        return dataclasses.replace(cfg, overrides=[*cfg.overrides, *defaults])

    def cast_teacher(self, dtype: torch.dtype) -> None:
        """Run the teacher's denoisers in `dtype` (bf16/fp16 halve their memory); the other
        components (text encoders, autoencoder) stay as they are.

        Args:
            dtype: The denoisers' new dtype.
        """
        for component in self.denoisers:
            self.denoiser(component).to(dtype)

    def _size(self, model_cfg: ModelConfig) -> Optional[tuple[int, ...]]:
        size: Optional[Sequence[int]] = (model_cfg.video_size if self.video
                                         else model_cfg.image_size)
        other = model_cfg.image_size if self.video else model_cfg.video_size
        if other is not None:
            field = "image_size" if self.video else "video_size"
            raise ConfigError(f"model.{field} is set, but {self.name} makes "
                              f"{'videos' if self.video else 'images'}; set model."
                              f"{'video_size' if self.video else 'image_size'} instead.")
        return tuple(size) if size is not None else self.default_size
