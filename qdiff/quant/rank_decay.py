"""QVGen rank-decay schedule that removes every auxiliary branch Phi by the end of training.

Phases of `phase_steps` steps. In a phase of rank r the top r//2 components are kept and
the others are faded by a factor going 1 -> 0 (cosine or linear); at the phase end the
rank halves and L@R is re-factored by SVD of the decayed product (so the next phase again
fades the weakest half). The phase at rank 1 fades the last component, after which Phi
is deleted from its layer: the state dict has no Phi keys and inference carries none.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

from torch import nn

from qdiff.config import AuxConfig

from .aux_branch import AuxBranch


def _decay_factor(progress: float, kind: str) -> float:
    """1 at the start of a phase, 0 at its end."""
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


class RankDecay:
    """Drives the aux branches of every layer of `model` from the global training step.

    Call `step(global_step)` at the start of every optimizer step (also right after a
    resume, before `load_state_dict`: it brings a fresh model's branches to the saved
    ranks). Pass the optimizer so that re-factored or deleted factors lose their stale
    state (Adam moments of the old shape) and deleted ones leave its param groups.
    `finish()` deletes whatever Phi is left (export calls it).
    """

    def __init__(self, model: nn.Module, aux_cfg: AuxConfig, total_steps: Optional[int] = None,
                 optimizer: Optional[Any] = None) -> None:
        self.layers: List[nn.Module] = [m for m in model.modules()
                                        if isinstance(getattr(m, "aux", None), AuxBranch)]
        self.initial_rank = aux_cfg.rank
        self.num_phases = aux_cfg.rank.bit_length()  # 32 -> 16 -> 8 -> 4 -> 2 -> 1 -> 0
        if aux_cfg.phase_steps is None and total_steps is None:
            raise ValueError("RankDecay needs aux.phase_steps or the run's total_steps.")
        self.phase_steps = aux_cfg.phase_steps or max(1, (total_steps - 1) // self.num_phases)
        self.kind = aux_cfg.decay
        self.optimizer = optimizer
        self.phase = 0
        self.factor = 1.0

    def rank_at(self, phase: int) -> int:
        """Schedule rank at the start of `phase` (0 once all phases are over)."""
        return self.initial_rank >> phase if phase < self.num_phases else 0

    @property
    def current_rank(self) -> int:
        """Rank of the current phase, for logging (0 when Phi is gone)."""
        return self.rank_at(self.phase)

    @property
    def finished(self) -> bool:
        return self.phase >= self.num_phases

    @property
    def end_step(self) -> int:
        """First global step at which no Phi remains."""
        return self.num_phases * self.phase_steps

    def step(self, global_step: int) -> None:
        """Bring every branch to the schedule's state at `global_step` (idempotent)."""
        self.phase = min(global_step // self.phase_steps, self.num_phases)
        progress = (global_step - self.phase * self.phase_steps) / self.phase_steps
        self.factor = _decay_factor(min(progress, 1.0), self.kind) if not self.finished else 0.0
        for layer in self.layers:
            while layer.aux is not None and int(layer.aux.phase) < self.phase:
                self._end_phase(layer)
            if layer.aux is not None:
                keep = min(layer.aux.rank, self.rank_at(self.phase + 1))
                layer.aux.set_decay(keep, self.factor)

    def finish(self) -> None:
        """Run the schedule to its end: no layer keeps a Phi."""
        self.step(self.end_step)

    def _end_phase(self, layer: nn.Module) -> None:
        branch: AuxBranch = layer.aux
        keep = min(branch.rank, self.rank_at(int(branch.phase) + 1))
        if keep == 0:
            self._forget(branch, remove=True)
            layer.aux = None
            return
        branch.set_decay(keep, 0.0)
        branch.refactor(keep)
        branch.phase += 1
        self._forget(branch, remove=False)

    def _forget(self, branch: AuxBranch, remove: bool) -> None:
        """Drop optimizer state of the branch's factors; with `remove`, the params too."""
        if self.optimizer is None:
            return
        params = {id(branch.L), id(branch.R)}
        for param in (branch.L, branch.R):
            self.optimizer.state.pop(param, None)
        if remove:
            for group in self.optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in params]
