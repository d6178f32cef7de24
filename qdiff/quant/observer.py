"""Bounded calibration statistics: a uniform sample of rows plus the exact range.

Calibration runs the teacher over whole trajectories; keeping every activation would
not fit in memory, yet the Lp clipping search needs the distribution, not only the
min/max. A fixed-size sample, kept uniform over everything seen (each call contributes
in proportion to its size), is enough for the search; the exact min/max is appended so
the search still spans the true range.
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch


class SampleObserver:
    """Uniform random sample of at most `capacity` rows (scalars or vectors) seen so far."""

    def __init__(self, capacity: int = 2048, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self.sample: Optional[torch.Tensor] = None
        self.low: Optional[torch.Tensor] = None
        self.high: Optional[torch.Tensor] = None
        self._generator = torch.Generator().manual_seed(seed)

    def _subsample(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        n = rows.shape[0]
        if count >= n:
            return rows
        if n > 8 * count:  # large activations: O(count) draws; repeats are negligible
            index = torch.randint(n, (count,), generator=self._generator)
        else:
            index = torch.randperm(n, generator=self._generator)[:count]
        return rows[index.to(rows.device)]

    @torch.no_grad()
    def add(self, rows: torch.Tensor) -> None:
        """Add `rows` (n, ...) to the sample, keeping it uniform over all rows seen."""
        rows = rows.detach().float()
        low, high = rows.amin(dim=0), rows.amax(dim=0)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        n = rows.shape[0]
        total = self.seen + n
        keep_old = 0 if self.sample is None else min(
            self.sample.shape[0], round(self.capacity * self.seen / total))
        keep_new = min(n, self.capacity - keep_old)
        parts = [self._subsample(rows, keep_new)]
        if self.sample is not None:
            parts.insert(0, self._subsample(self.sample, keep_old))
        self.sample = torch.cat(parts)
        self.seen = total

    def values(self) -> torch.Tensor:
        """The sample with the exact min and max rows appended."""
        if self.sample is None:
            raise RuntimeError("No calibration data was observed.")
        return torch.cat([self.sample, self.low[None], self.high[None]])


class KeyedObservations:
    """Calibration-mode bookkeeping shared by the activation quantizers: one SampleObserver
    per key (a timestep value, or a timestep group), filled row by row.

    The host sets `calibrating` and `sample_size`; `_observers` is emptied when it starts.
    """

    calibrating: bool
    sample_size: int
    _observers: Dict[Union[int, float], SampleObserver]

    def start_calibration(self) -> None:
        self.calibrating = True
        self._observers = {}

    @property
    def has_observations(self) -> bool:
        return bool(self._observers)

    @torch.no_grad()
    def _observe_by_key(self, x: torch.Tensor, keys: torch.Tensor, row_width: int) -> None:
        """Add the samples of `x` (batch first) under their key; rows of `row_width` values
        (-1: one value per row)."""
        for key in keys.unique().tolist():
            rows = x[(keys == key).to(x.device)]
            rows = rows.reshape(-1) if row_width == -1 else rows.reshape(-1, row_width)
            self._observers.setdefault(key, SampleObserver(self.sample_size)).add(rows)
