"""Families: what qdiff needs to know of each kind of diffusers pipeline, declared.

    family = family_for(pipe, cfg.model)          # model.family, or "auto" from the pipeline
    kwargs = family.call_kwargs(ids, generators, steps=20, guidance=2.0)
    pipe(**kwargs)                                # the stock pipeline walks; qdiff.walk listens

One file per family, each a `Family` subclass registered with `@register_family`;
`family` holds the declaration's base class, `conditions` the prompt and image sources,
`registry` the lookup.
"""

from .conditions import read_images, read_prompts
from .family import Family, frames_side_by_side
from .registry import FAMILIES, family_class, family_for, load_families, register_family

load_families()

__all__ = ["FAMILIES", "Family", "family_class", "family_for", "frames_side_by_side",
           "load_families", "read_images", "read_prompts", "register_family"]
