"""Family adapters: what distillation needs from each kind of pipeline, behind one interface.

    family = family_for(pipe, cfg.model)          # model.family, or "auto" from the pipeline
    context = family.context(condition_ids, guidance)
    noise = family.guided_noise(x_t, t, context, guidance, denoiser=student)
    branches = family.branch_noise(x_t, t, context, guidance, denoiser=student)  # before CFG
    assert torch.equal(noise, combine_branches(branches, guidance))

One file per family: `class_ldm` (qdiff's class-conditional LDM), `stable_diffusion`,
`dit`, `class_wan` (qdiff's class-conditional Wan video pipeline), `wan`, `cogvideox`;
`base` holds the interface, `prompts` the prompt conditions of the text-conditioned
families, `samplers` the trajectory samplers, `registry` the lookup.
"""

from qdiff.guidance import combine_branches

from .base import FamilyAdapter
from .class_ldm import ClassLDMFamily
from .class_wan import ClassWanFamily
from .cogvideox import CogVideoXFamily
from .dit import DiTFamily
from .prompts import PromptFamily, read_prompts
from .registry import FAMILY_ADAPTERS, family_for
from .stable_diffusion import StableDiffusionFamily
from .wan import WanFamily

__all__ = ["FAMILY_ADAPTERS", "ClassLDMFamily", "ClassWanFamily", "CogVideoXFamily", "DiTFamily",
           "FamilyAdapter", "PromptFamily", "StableDiffusionFamily", "WanFamily", "family_for",
           "combine_branches", "read_prompts"]
