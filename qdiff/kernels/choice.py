"""Timing kernels against each other: the "auto" choice per shape, remembered for the process.

Like `torch.backends.cudnn.benchmark`: on the first call with a shape key, every candidate
runs once untimed (first-call allocations, kernel selection), then a few times timed; the
fastest is remembered and runs from then on. All candidates give the same numbers, so the
choice changes only speed.
"""

from __future__ import annotations

import time
from typing import Callable, Hashable, Mapping, TypeVar

import torch

_REPEATS = 3

T = TypeVar("T")
_CHOICES: dict[Hashable, str] = {}


def choices() -> dict[Hashable, str]:
    """What "auto" picked so far, by shape key (a copy).

    Returns:
        `{shape key: kernel name}`.
    """
    return dict(_CHOICES)


def chosen(key: Hashable, candidates: Mapping[str, Callable[[], T]]) -> str:
    """The candidate `pick` runs for `key` (the remembered one, else the first).

    Args:
        key: What the choice is remembered by.
        candidates: The names `pick` was given, in order of preference.

    Returns:
        A candidate's name.
    """
    return _CHOICES.get(key, next(iter(candidates)))


def clear_choices() -> None:
    """Forget the measurements (e.g. after the machine's load changed)."""
    _CHOICES.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable[[], T], device: torch.device, timer: Callable[[], float],
            give_up: float) -> float:
    """Best of a few timed runs; stops early once clearly slower than `give_up` seconds."""
    best = float("inf")
    for _ in range(_REPEATS):
        _sync(device)
        start = timer()
        run()
        _sync(device)
        best = min(best, timer() - start)
        if best > 2 * give_up:  # clearly the slower one: no need to confirm
            break
    return best


def pick(key: Hashable, candidates: Mapping[str, Callable[[], T]], device: torch.device,
         timer: Callable[[], float] = time.perf_counter) -> T:
    """Run the remembered candidate for `key`, or time them all, remember the fastest, run it.

    `candidates` map a kernel name to a call; all must give the same result. Under
    `torch.compile` nothing is timed: the remembered choice, else the first candidate.

    Args:
        key: What the choice is remembered by (the operands' shapes and device).
        candidates: `{kernel name: call}`, in order of preference.
        device: The device the calls run on (synchronised around each timing).
        timer: The clock to time with.

    Returns:
        The result of the chosen call.
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
            timings[candidate] = seconds(run, device, timer, min(timings.values(), default=float("inf")))
        name = _CHOICES[key] = min(timings, key=timings.get)
    return candidates[name]()
