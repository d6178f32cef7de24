"""The family registry: `@register_family(name)` on a `Family` subclass, `family_for(pipe)`.

Every module of this package is imported when `qdiff.families` is (`load_families`), so a
family file registers itself: adding a family edits nothing else. `model.family` names a
registered family, or "auto" to take the first whose `matches(pipe)` is true.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Optional, TypeVar

from diffusers import DiffusionPipeline

from qdiff.config import ConfigError, ModelConfig
from qdiff.registry import ClassRegistry

from .family import Family

F = TypeVar("F", bound=type)
FAMILIES = ClassRegistry("Family", Family, "name")


def register_family(name: str) -> Callable[[F], F]:
    """Class decorator: the `Family` subclass `model.family: name` stands for.

    Args:
        name: The value of `model.family` that selects the decorated class.

    Returns:
        A decorator that registers the class and returns it unchanged.
    """
    return FAMILIES.register(name)


def load_families() -> None:
    """Import every module of `qdiff.families`, so each family file has registered itself.

    Raises:
        ImportError: A family module cannot be imported (a missing dependency of that family).
    """
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")


def family_class(pipe: DiffusionPipeline, name: str = "auto") -> type[Family]:
    """The family `name` (checked against `pipe`), or with "auto" the first that matches.

    Args:
        pipe: The pipeline to serve.
        name: A registered family name, or "auto".

    Returns:
        The `Family` subclass.

    Raises:
        ConfigError: With "auto", no family matches `pipe`; otherwise `name` is not registered,
            or its family does not fit `pipe`.
    """
    if name == "auto":
        for family in FAMILIES.values():
            if family.matches(pipe):
                return family
        raise ConfigError(f"No family recognises a {type(pipe).__name__} with components "
                          f"{sorted(pipe.components)}; supported: {list(FAMILIES)} "
                          f"(docs/extending/add-a-family.md adds one).")
    if name not in FAMILIES:
        raise ConfigError(f"model.family='{name}' is not a registered family; choose 'auto' or "
                          f"one of {list(FAMILIES)}.")
    family = FAMILIES[name]
    if not family.matches(pipe):
        raise ConfigError(f"model.family='{name}' does not fit the pipeline, a "
                          f"{type(pipe).__name__}; set model.family=auto or point model.path at "
                          f"a {name} pipeline.")
    return family


def family_for(pipe: DiffusionPipeline | Family, model_cfg: Optional[ModelConfig] = None) -> Family:
    """The family of `pipe` (a `Family` is returned as it is), with what `model_cfg` says
    about conditions and sizes. Without `model_cfg` the family is detected and a prompt
    family has no prompts (asking it for conditions then says how to give them).

    Args:
        pipe: The teacher pipeline, or a `Family` already built.
        model_cfg: The run's `model` block (family name, prompts, images, size, extra kwargs).

    Returns:
        The family, built on `pipe`.

    Raises:
        ConfigError: No family fits `pipe` (see `family_class`), or `model.prompts` /
            `model.images` cannot be read.
    """
    if isinstance(pipe, Family):
        return pipe
    model_cfg = model_cfg or ModelConfig()
    return family_class(pipe, model_cfg.family)(pipe, model_cfg)
