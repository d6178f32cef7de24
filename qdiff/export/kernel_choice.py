"""Which kernel an integer layer runs: chosen by the user, or measured per shape ("auto").

Kernels (every one computes the same exact integer sums; they differ only in speed):

- "auto" (default): per layer shape and input shape, the faster of the device's integer
  kernel (`integer_kernel`) and "float", timed on the first call with that shape (like
  `torch.backends.cudnn.benchmark`) and remembered for the process;
- "int8": `torch._int_mm` on int8 operands (convolutions through int8 patches); where a
  layer cannot use it (grouped or non-zero-padded convolutions, per-token convolutions)
  the layer falls back to the exact float sum;
- "onednn": the same operands on oneDNN's quantized linear (CPU; `onednn_gemm`), for
  layers whose weights have 7 bits or fewer, else the exact float sum;
- "float": the exact float sum on the same operands (float32 where exact, else float64);
- "reference": the export's reference computation, which decodes the packed codes on
  every call; the fast kernels are checked against it.

The default comes from the environment variable `QDIFF_KERNEL`, so a plain
`DiffusionPipeline.from_pretrained` picks it up; `model.set_qdiff_kernel(name)` changes it.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Hashable, Mapping, TypeVar

import torch

from . import onednn_gemm
from .int8_gemm import int8_mm
from .int8_weight import Int8Weight

KERNELS = ("auto", "int8", "onednn", "float", "reference")
ENV_VAR = "QDIFF_KERNEL"
_REPEATS = 3

T = TypeVar("T")
_CHOICES: dict[Hashable, str] = {}
_INTEGER_KERNEL: dict[str, str] = {}
_PROBE_SHAPE = (256, 512, 512)  # (M, K, N) of the product that picks the integer kernel


def check_kernel(name: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"Unknown qdiff kernel {name!r}; choose one of {KERNELS} "
                         f"(e.g. model.set_qdiff_kernel('auto') or {ENV_VAR}=int8).")
    return name


def default_kernel() -> str:
    """The kernel new integer layers start with: `$QDIFF_KERNEL`, else "auto"."""
    name = os.environ.get(ENV_VAR, "auto")
    if name not in KERNELS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a qdiff kernel; choose one of {KERNELS}.")
    return name


def choices() -> dict[Hashable, str]:
    """What "auto" picked so far, by shape key (a copy)."""
    return dict(_CHOICES)


def clear_choices() -> None:
    """Forget the measurements (e.g. after the machine's load changed)."""
    _CHOICES.clear()


def integer_kernel(device: torch.device) -> str:
    """"onednn" where oneDNN's quantized linear beats `torch._int_mm` on a reference product
    (CPUs without VNNI, where `_int_mm` is many times slower than float), else "int8".

    Measured once per device type: every layer on the device then holds its weights in the
    winner's format (one copy), and "auto" weighs only that kernel against "float".
    """
    if device.type not in _INTEGER_KERNEL:
        if torch.compiler.is_compiling():  # nothing is timed while tracing
            return "int8"
        _INTEGER_KERNEL[device.type] = _measure_integer_kernel(device)
    return _INTEGER_KERNEL[device.type]


def _measure_integer_kernel(device: torch.device) -> str:
    if not onednn_gemm.available(device):
        return "int8"
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-8, 8, _PROBE_SHAPE[:2], generator=gen, dtype=torch.int8)
    weight = Int8Weight(torch.randint(-8, 8, _PROBE_SHAPE[1:][::-1], generator=gen, dtype=torch.int8),
                        torch.zeros(_PROBE_SHAPE[2], dtype=torch.int32))
    int8 = _seconds(lambda: int8_mm(a, weight.plain), device, time.perf_counter, float("inf"))
    u = onednn_gemm.shifted(a)  # the uint8 operand the layers pass
    onednn = _seconds(lambda: onednn_gemm.onednn_sum(u, None, weight), device, time.perf_counter, int8)
    return "onednn" if onednn < int8 else "int8"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(run: Callable[[], T], device: torch.device, timer: Callable[[], float],
             give_up: float) -> float:
    """Best of a few timed runs; stops early once clearly slower than `give_up` seconds."""
    best = float("inf")
    for _ in range(_REPEATS):
        _sync(device)
        start = timer()
        run()
        _sync(device)
        best = min(best, timer() - start)
        if best > 2 * give_up:  # a float sum may take 10x the int8 one: no need to confirm
            break
    return best


def pick(key: Hashable, candidates: Mapping[str, Callable[[], T]], device: torch.device,
         timer: Callable[[], float] = time.perf_counter) -> T:
    """Run the remembered candidate for `key`, or time them all, remember the fastest, run it.

    `candidates` map a kernel name to a call; all must give the same result. Under
    `torch.compile` nothing is timed: the remembered choice, else the first candidate.
    """
    if len(candidates) == 1:
        return next(iter(candidates.values()))()
    name = _CHOICES.get(key)
    if name is None and torch.compiler.is_compiling():
        name = next(iter(candidates))
    if name is None:
        timings: dict[str, float] = {}
        for candidate, run in candidates.items():
            run()  # warm-up: first-call allocations and kernel selection
            timings[candidate] = _seconds(run, device, timer, min(timings.values(), default=float("inf")))
        name = _CHOICES[key] = min(timings, key=timings.get)
    return candidates[name]()
