"""The denoiser's current timestep, shared by all quantizers of one model.

Quantizers never count calls (a sampler may skip, repeat or batch steps); they read the
timestep the denoiser was actually called with. A forward pre-hook on the denoiser root
stores it here; every quantized layer of that model holds a reference to the same
context. The value stays set after the forward, so activation recomputation (gradient
checkpointing) in the backward pass sees the same timestep.

The timestep itself lives outside the model, in a module-level registry keyed per
context: `torch.compile` with inductor's freezing (which the onednn kernel needs) treats
every tensor reachable from a module as a constant, so a timestep held on the context
would be frozen into the graph, and each new one would recompile it.

The layers of one model usually share one table of timesteps, so the context also
remembers, for the current call, the nearest table entry per table content (`nearest`):
a model of a few hundred small layers then pays one lookup per call, not one per layer.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import weakref
from typing import Any, Hashable, Iterator, Optional, Union

import torch
from torch import nn

TimestepLike = Union[int, float, torch.Tensor]


def _as_per_sample(timestep: TimestepLike) -> torch.Tensor:
    """1-D float tensor: one entry, or one per sample.

    Per-token timesteps (B, L) (e.g. Wan 2.2 TI2V, where conditioning-frame tokens sit at
    t = 0) reduce to each sample's largest, i.e. the timestep of its noisy tokens.
    """
    t = torch.as_tensor(timestep).detach()
    if t.dim() == 2:
        t = t.amax(dim=1)
    if t.dim() > 1:
        raise ValueError(f"Expected a scalar or one timestep per sample, got shape {tuple(t.shape)}.")
    return t.reshape(-1).float()


def nearest_index(table: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry for each timestep."""
    return (timesteps.to(table.device, table.dtype)[:, None] - table[None, :]).abs().argmin(dim=1)


_TIMESTEPS: dict[int, Optional[torch.Tensor]] = {}  # context key -> its current timesteps
_KEYS = itertools.count()


class TimestepContext:
    """Holds the timestep(s) of the current denoiser call (a scalar or one per sample)."""

    def __init__(self) -> None:
        self._key = next(_KEYS)
        _TIMESTEPS[self._key] = None
        weakref.finalize(self, _TIMESTEPS.pop, self._key, None)
        self._arg_index = 1
        self._handle: Optional[Any] = None
        self._nearest: dict[Hashable, tuple[int, ...]] = {}
        self._nearest_of: Optional[torch.Tensor] = None  # the `timesteps` those lookups are for

    @property
    def timesteps(self) -> Optional[torch.Tensor]:
        return _TIMESTEPS[self._key]

    @timesteps.setter
    def timesteps(self, value: Optional[torch.Tensor]) -> None:
        _TIMESTEPS[self._key] = value

    def __getstate__(self) -> dict:
        """Copies (deepcopy of a model) get their own registry entry, starting at this timestep."""
        state = {**self.__dict__, "timesteps": self.timesteps}
        del state["_key"]
        return state

    def __setstate__(self, state: dict) -> None:
        timesteps = state.pop("timesteps")
        self.__init__()
        self.__dict__.update(state)
        self.timesteps = timesteps

    def set(self, timestep: Optional[TimestepLike]) -> None:
        # A copy: `nearest` remembers lookups for this tensor, which the caller may change in place.
        self.timesteps = None if timestep is None else _as_per_sample(timestep).clone()

    @contextlib.contextmanager
    def use(self, timestep: TimestepLike) -> Iterator[None]:
        """Set the timestep for a block of direct layer calls, then restore the previous one."""
        previous = self.timesteps
        self.set(timestep)
        try:
            yield
        finally:
            self.timesteps = previous

    def per_sample(self, batch_size: int) -> Optional[torch.Tensor]:
        """One timestep per row of an activation batch, or None when none was set.

        A batch that folds extra dims into the batch (e.g. (B*frames, ...)) repeats each
        sample's timestep over its consecutive rows.
        """
        t = self.timesteps
        if t is None:
            return None
        if t.numel() == 1:
            return t.expand(batch_size)
        if batch_size % t.numel() == 0:
            return t.repeat_interleave(batch_size // t.numel())
        if bool((t == t[0]).all()):
            return t[:1].expand(batch_size)
        raise ValueError(f"Activation batch of {batch_size} rows cannot be matched to "
                         f"{t.numel()} per-sample timesteps.")

    def nearest(self, table: torch.Tensor, key: Hashable) -> Optional[tuple[int, ...]]:
        """The index of `table`'s nearest entry for each timestep (one per sample, or one),
        or None when none is set; looked up once per timestep value set and table content
        `key` (the caller's: equal tables, equal keys)."""
        if self.timesteps is None:
            return None
        if self._nearest_of is not self.timesteps:  # a new call (`set`, or `use` restoring)
            self._nearest, self._nearest_of = {}, self.timesteps
        index = self._nearest.get(key)
        if index is None:
            index = self._nearest[key] = tuple(nearest_index(table, self.timesteps).tolist())
        return index

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook for the denoiser root: record its `timestep` argument."""
        if "timestep" in kwargs:
            timestep = kwargs["timestep"]
        elif len(args) > self._arg_index:
            timestep = args[self._arg_index]
        else:
            return
        if timestep is not None:
            self.set(timestep)

    def install(self, root: nn.Module) -> None:
        """Register the pre-hook on `root`; the positional slot comes from its forward signature."""
        if self._handle is not None:
            return
        names = [name for name in inspect.signature(root.forward).parameters if name != "self"]
        self._arg_index = names.index("timestep") if "timestep" in names else 1
        self._handle = root.register_forward_pre_hook(self.pre_hook, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
