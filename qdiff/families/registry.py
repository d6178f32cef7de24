"""`family_for`: the adapter of a pipeline, named by `model.family` or detected from it."""

from __future__ import annotations

from typing import Optional, Union

from diffusers import DiffusionPipeline

from qdiff.config import ConfigError, ModelConfig

from .base import FamilyAdapter
from .class_ldm import ClassLDMFamily
from .class_wan import ClassWanFamily
from .cogvideox import CogVideoXFamily
from .dit import DiTFamily
from .stable_diffusion import StableDiffusionFamily
from .wan import WanFamily

# Detection order matters only if two could match; none of these do.
FAMILY_ADAPTERS: dict[str, type[FamilyAdapter]] = {
    family.name: family
    for family in (ClassLDMFamily, StableDiffusionFamily, DiTFamily, ClassWanFamily, WanFamily,
                   CogVideoXFamily)
}


def _family_class(pipe: DiffusionPipeline, name: str) -> type[FamilyAdapter]:
    if name == "auto":
        for family in FAMILY_ADAPTERS.values():
            if family.matches(pipe):
                return family
        raise ConfigError(f"No family adapter recognises a {type(pipe).__name__} with components "
                          f"{sorted(pipe.components)}; supported: {list(FAMILY_ADAPTERS)}.")
    family = FAMILY_ADAPTERS[name]
    if not family.matches(pipe):
        raise ConfigError(f"model.family='{name}' does not fit the pipeline, a "
                          f"{type(pipe).__name__}; set model.family=auto or point model.path at "
                          f"a {name} pipeline.")
    return family


def family_for(pipe: Union[DiffusionPipeline, FamilyAdapter],
               model_cfg: Optional[ModelConfig] = None) -> FamilyAdapter:
    """The adapter for `pipe` (an adapter is returned as it is).

    Without `model_cfg` the family is detected, and a prompt family has no prompts (asking
    it for conditions then says how to give them).
    """
    if isinstance(pipe, FamilyAdapter):
        return pipe
    model_cfg = model_cfg or ModelConfig()
    return _family_class(pipe, model_cfg.family).from_model_config(pipe, model_cfg)
