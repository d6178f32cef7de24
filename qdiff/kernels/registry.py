"""The kernel registry: names -> `Kernel`s, the user's setting, and what "auto" runs.

A layer's kernel setting is a name:

- "auto" (default): per layer and input shape, the fastest of the registered
  `auto_candidate`s available on the device and exact there, and the fallback, each
  timed as the layer's whole forward (kernels differ in what they fuse around the sum)
  on the first call with that shape and remembered (`choice.pick`);
- a registered kernel's name ("int8", "onednn", "float" built in; `register_kernel` adds
  one): that kernel wherever it gives the exact sum (`Kernel.supports`), else the fallback;
- "reference": the layer's reference path, which decodes the packed codes on every
  call; the kernels are checked against it. It is the layers' own computation, not a
  `Kernel`: it reads the packed file format rather than prepared operands, and as the
  yardstick it must not share their code.

The default comes from the environment variable `QDIFF_KERNEL`, so a plain
`DiffusionPipeline.from_pretrained` picks it up; `model.set_qdiff_kernel(name)` changes it.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

from qdiff.errors import QdiffError

from .base import Kernel
from .int8_weight import Int8Weight

AUTO, REFERENCE = "auto", "reference"
FALLBACK = "float"  # the exact float sum: supports every operand
ENV_VAR = "QDIFF_KERNEL"

K = TypeVar("K", bound=type)
_KERNELS: dict[str, Kernel] = {}


class UnknownKernelError(QdiffError, ValueError):
    """A kernel name that is not registered (the message lists the choices)."""


def register_kernel(name: str) -> Callable[[K], K]:
    """Class decorator: register one instance of a `Kernel` subclass under `name`.

    Args:
        name: The kernel's name (a layer setting and a `QDIFF_KERNEL` value).

    Returns:
        A decorator that registers an instance and returns the class unchanged.

    Raises:
        ValueError: `name` is taken, or is "auto" or "reference".
        TypeError: The decorated object is not a `Kernel` subclass.
    """
    def register(cls: K) -> K:
        if name in (AUTO, REFERENCE) or name in _KERNELS:
            raise ValueError(f"qdiff kernel name {name!r} is taken; registered: {kernel_names()}.")
        if not (isinstance(cls, type) and issubclass(cls, Kernel)):
            raise TypeError(f"register_kernel({name!r}) decorates a Kernel subclass, not {cls!r}.")
        kernel = cls()
        kernel.name = name
        _KERNELS[name] = kernel
        return cls
    return register


def unregister_kernel(name: str) -> None:
    """Remove a registered kernel (layers set to it then fail on their next call).

    Args:
        name: A registered kernel's name; an unknown name is ignored.
    """
    get_kernel(name)
    del _KERNELS[name]


def kernel_names() -> tuple[str, ...]:
    """Every name a layer can be set to: "auto", the registered kernels, "reference".

    Returns:
        The names, "auto" first and "reference" last.
    """
    return (AUTO, *_KERNELS, REFERENCE)


def available_kernels(device: torch.device) -> tuple[str, ...]:
    """The registered kernels that run on `device` (in registration order).

    Args:
        device: The device asked about.

    Returns:
        The kernel names.
    """
    return tuple(name for name, kernel in _KERNELS.items() if kernel.available(torch.device(device)))


def get_kernel(name: str) -> Kernel:
    """The registered kernel `name`.

    Args:
        name: A registered kernel's name.

    Returns:
        The kernel instance.

    Raises:
        UnknownKernelError: `name` is not registered (including the settings "auto" and
            "reference", which name no single kernel).
    """
    kernel = _KERNELS.get(name)
    if kernel is None:
        check_kernel(name)
        raise UnknownKernelError(f"{name!r} is a kernel setting, not a registered kernel; "
                                 f"registered: {tuple(_KERNELS)}.")
    return kernel


def check_kernel(name: str) -> str:
    """`name` if a layer can be set to it, else an `UnknownKernelError` listing the choices.

    Args:
        name: A kernel setting.

    Returns:
        `name`.

    Raises:
        UnknownKernelError: `name` is not one of `kernel_names()`.
    """
    if name not in kernel_names():
        raise UnknownKernelError(f"Unknown qdiff kernel {name!r}; choose one of {kernel_names()} "
                                 f"(e.g. model.set_qdiff_kernel('auto') or {ENV_VAR}=int8).")
    return name


def default_kernel() -> str:
    """The kernel new integer layers start with: `$QDIFF_KERNEL`, else "auto".

    Returns:
        A kernel setting.

    Raises:
        UnknownKernelError: `$QDIFF_KERNEL` names no kernel setting.
    """
    name = os.environ.get(ENV_VAR, AUTO)
    if name not in kernel_names():
        raise UnknownKernelError(f"{ENV_VAR}={name!r} is not a qdiff kernel; choose one of {kernel_names()}.")
    return name


def prepare(name: str, weight: Int8Weight) -> None:
    """Hold `weight` as kernel setting `name` reads it ("auto" keeps what is held).

    Args:
        name: A kernel setting.
        weight: The prepared weight.

    Raises:
        UnknownKernelError: `name` is not "auto" and not a registered kernel.
    """
    if name != AUTO:
        get_kernel(name).prepare(weight)


def own_layout(kernel: Kernel) -> bool:
    """Whether the kernel reads its own copy of the weight (`Kernel.pack`) rather than the
    plain int8 matrix."""
    return type(kernel).pack is not Kernel.pack


def candidates(name: str, device: torch.device, exact: Callable[[Kernel], bool]) -> tuple[Kernel, ...]:
    """The kernels a layer set to `name` may run on operands for which `exact(kernel)` says
    whether a kernel gives the exact sum: the named kernel where it is available and exact,
    else the fallback; for "auto" every available and exact `auto_candidate` and the
    fallback, to be timed against each other: those that read the plain matrix first, so
    none is timed on a weight another has repacked.

    Args:
        name: The layer's kernel setting.
        device: The operands' device.
        exact: Whether a kernel gives the exact sum on these operands.

    Returns:
        The kernels, in order of preference.

    Raises:
        UnknownKernelError: `name` is not a kernel setting.
    """
    fallback = get_kernel(FALLBACK)
    if name == AUTO:
        usable = [kernel for kernel in _KERNELS.values()
                  if kernel.auto_candidate and kernel is not fallback and kernel.available(device) and exact(kernel)]
        return tuple(sorted([*usable, fallback], key=own_layout))
    kernel = get_kernel(name)
    usable = kernel is fallback or (kernel.available(device) and exact(kernel))
    return (kernel,) if usable else (fallback,)
