"""Family adapters: what distillation needs from each kind of pipeline, behind one interface.

    family = family_for(pipe, cfg.model)          # model.family, or "auto" from the pipeline
    context = family.context(condition_ids, guidance)
    noise = family.guided_noise(x_t, t, context, guidance, denoiser=student)

One file per family: `class_ldm` (qdiff's class-conditional LDM), `stable_diffusion`,
`dit`; `base` holds the interface, `registry` the lookup.
"""

from .base import FamilyAdapter
from .class_ldm import ClassLDMFamily
from .dit import DiTFamily
from .registry import FAMILY_ADAPTERS, family_for
from .stable_diffusion import StableDiffusionFamily, read_prompts

__all__ = ["FAMILY_ADAPTERS", "ClassLDMFamily", "DiTFamily", "FamilyAdapter",
           "StableDiffusionFamily", "family_for", "read_prompts"]
