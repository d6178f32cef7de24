"""Divergence is a failure, not a result: the run stops, names its last good checkpoint,
and exports nothing.

`DivergenceWatch` sees every step's loss (a float: no work on tensors) and compares it
with two references taken at the start of the run, both by `distill.divergence_factor`:

- the mean loss over the last trajectory (`distill.trajectory_steps` steps, so every
  denoising step counts once) against the mean over the run's first trajectory: a run
  that trained well and then broke down;
- the loss at each trajectory's first denoising step against the run's very first loss,
  the untrained (PTQ) student's at that step: a run whose first updates already broke it,
  which the first trajectory's mean cannot show, being made of broken steps itself.

A healthy run's loss only falls from both references. The references are saved in each
checkpoint's meta (`meta()`), so a resumed run compares with the run's start, not its own.

`nonfinite_quantizer_tables` is the other collapse: a step size, zero point or table entry
that is no longer a number (checked when the run logs or checkpoints, so that a
checkpoint of a collapsed student is never written).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch
from torch import nn

from qdiff.distill.checkpoint import checkpoint_meta, list_checkpoints
from qdiff.errors import QdiffError
from qdiff.quant import iter_quant_layers

TRAJECTORY_KEY = "divergence_first_trajectory_loss"
FIRST_STEP_KEY = "divergence_first_step_loss"


class DivergenceError(QdiffError, RuntimeError):
    """The loss ran away (or a quantizer table collapsed); the run stops without export."""


class DivergenceWatch:
    """Per-step loss bookkeeping against the run's first trajectory (see the module doc)."""

    def __init__(self, factor: float, trajectory_steps: int,
                 first_trajectory: float | None = None, first_step: float | None = None):
        self.factor, self.trajectory_steps = factor, trajectory_steps
        self.first_trajectory, self.first_step = first_trajectory, first_step
        self.window: deque[float] = deque(maxlen=trajectory_steps)

    def meta(self) -> dict:
        """What a checkpoint keeps so that a resumed run has the same references."""
        return {TRAJECTORY_KEY: self.first_trajectory, FIRST_STEP_KEY: self.first_step}

    def check(self, step: int, loss: float) -> str | None:
        """Take the loss of (0-based) `step`; what diverged, or None while the run is healthy."""
        if step == 0:
            self.first_step = loss
        self.window.append(loss)
        full = len(self.window) == self.trajectory_steps
        if self.first_trajectory is None:
            if full:  # the run's first trajectory (or a resumed run's, where none was saved)
                self.first_trajectory = sum(self.window) / self.trajectory_steps
            return None
        if self.factor <= 0:
            return None
        if (step % self.trajectory_steps == 0 and self.first_step
                and loss > self.factor * self.first_step):
            return (f"the loss at the trajectory's first denoising step is {loss:.4g}, "
                    f"{loss / self.first_step:.3g}x the untrained student's {self.first_step:.4g} "
                    f"(distill.divergence_factor={self.factor:g})")
        mean = sum(self.window) / len(self.window)
        if full and mean > self.factor * self.first_trajectory:
            return (f"the mean loss of the last {self.trajectory_steps} steps is {mean:.4g}, "
                    f"{mean / self.first_trajectory:.3g}x the first trajectory's "
                    f"{self.first_trajectory:.4g} (distill.divergence_factor={self.factor:g})")
        return None


def saved_references(run_dir: Path, step: int) -> dict:
    """The references saved in the run's checkpoint of `step` (empty where none were)."""
    for checkpoint in reversed(list_checkpoints(run_dir)):
        meta = checkpoint_meta(checkpoint)
        if meta["step"] == step:
            return {"first_trajectory": meta.get(TRAJECTORY_KEY),
                    "first_step": meta.get(FIRST_STEP_KEY)}
    return {}


def nonfinite_quantizer_tables(model: nn.Module) -> list[str]:
    """Names of the quantized layers with a non-finite quantizer parameter or table entry.

    One device sync for the whole model: the per-tensor tests are stacked first."""
    names, flags = [], []
    for name, layer in iter_quant_layers(model):
        for quantizer in (layer.weight_quantizer, layer.act_quantizer):
            tensors = [t for t in (*quantizer.parameters(), *quantizer.buffers())
                       if t.is_floating_point() and t.numel()]
            if tensors:
                names.append(name)
                flags.append(torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all())
    if not flags:
        return []
    finite = torch.stack(flags).tolist()
    return sorted({name for name, ok in zip(names, finite) if not ok})


def describe_collapse(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} quantized layers have non-finite step sizes or tables ({shown})"
