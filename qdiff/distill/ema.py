"""An exponential moving average of the student's trained parameters (`distill.ema_decay`).

The optimizer moves the live parameters; the average follows them, and the average is the
run's student: what its sample grids show, what it exports and what an evaluation of a
checkpoint loads. Why: one step per denoising step at batch 16 makes every update noisy,
and the run's last iterate keeps the noise of its last steps; the average keeps less of
it. The live parameters stay what training continues from (a resumed run needs them).

QVGen's Phi is not averaged: rank decay changes its shape during the run and removes it
by the end, so an average of it would never reach the export.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from qdiff.config import ConfigError
from qdiff.quant import quant_parameters

EMA_FILE = "ema.safetensors"


class ParameterEMA:
    """`shadow = d * shadow + (1 - d) * live` after every optimizer step.

    d ramps up as min(decay, (1 + step) / (ramp + step)), so the first steps do not leave the
    average stuck near the calibrated start. At ramp 10 (diffusers' EMAModel) it reaches 0.99
    at step 890 and 0.995 at step 1790: in shorter runs it is the ramp that averages,
    weighting step s about as s^(ramp - 2), so the average is on average steps / ramp old;
    `decay` caps longer runs."""

    def __init__(self, model: nn.Module, decay: float, ramp: float = 10.0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay}: an average needs 0 < decay < 1")
        self.decay, self.ramp = decay, ramp
        self.live = averaged_parameters(model)
        self.shadow = {name: param.detach().clone() for name, param in self.live.items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (self.ramp + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the live parameters after optimizer step `step` (counted from 0)."""
        weight = 1.0 - self.decay_at(step)
        for name, param in self.live.items():
            self.shadow[name].lerp_(param.detach(), weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.contiguous() for name, value in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor],
                        source: str = "the saved average") -> None:
        copy_average(self.shadow, state, source)

    def copy_to_model(self) -> None:
        """Replace the live parameters by their average (for good: the end of a run)."""
        self._assign(self.shadow)

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The averaged parameters inside the block, the live ones again after it."""
        kept = {name: param.detach().clone() for name, param in self.live.items()}
        self._assign(self.shadow)
        try:
            yield
        finally:
            self._assign(kept)

    def _assign(self, values: dict[str, torch.Tensor]) -> None:
        copy_average(self.live, values, "the average")


def averaged_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an average follows: the trained ones, less Phi."""
    phi = {id(param) for param in quant_parameters(model).aux}
    return {name: param for name, param in model.named_parameters()
            if param.requires_grad and id(param) not in phi}


@torch.no_grad()
def copy_average(targets: dict[str, torch.Tensor], values: dict[str, torch.Tensor],
                 source: str) -> None:
    """Copy `values` into the tensors of the same names; a `ConfigError` naming `source`
    where the two name sets differ (a checkpoint of another config)."""
    if values.keys() != targets.keys():
        missing = sorted(targets.keys() - values.keys())[:5]
        unexpected = sorted(values.keys() - targets.keys())[:5]
        raise ConfigError(f"{source} does not match this student (missing {missing}, "
                          f"unexpected {unexpected}); was the config changed since the run "
                          f"started?")
    for name, target in targets.items():
        target.copy_(values[name])
