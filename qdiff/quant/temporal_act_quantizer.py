"""Temporal LSQ: a per-tensor activation step size for every timestep value.

Diffusion activations change range a lot across the trajectory, so EfficientDM learns
one step size per sampling step. The table is keyed by the timestep *value* (buffer
`timesteps`), read from the shared `TimestepContext`, never by counting calls: a sample
of a batch uses its own timestep's entry, and a timestep missing from the table uses the
nearest calibrated one (100-step calibration serves 20-step sampling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .act_quantizer import ActQuantizer, ActTable, register_act_quantizer
from .observer import KeyedObservations, SampleObserver
from .primitives import (fake_quantize, grad_scale, int_range, lp_search_init, lsq_gradient_factor,
                         scale_from_range)
from .timestep_context import TimestepContext, nearest_index

if TYPE_CHECKING:
    from qdiff.config import QuantConfig


@register_act_quantizer("temporal")
class TemporalActQuantizer(KeyedObservations, ActQuantizer):
    """Per-tensor activation fake-quantizer whose step size depends on the timestep.

    Lifecycle: `start_calibration()`, run the model over calibration trajectories
    (inputs pass through unquantized while per-timestep samples are recorded),
    `finish_calibration()` (Lp search per timestep). `set_timesteps()` declares the
    table explicitly, e.g. from `scheduler.timesteps`; otherwise the calibrated values
    form it.
    """

    def __init__(self, bits: int, context: TimestepContext, *, symmetric: bool = False,
                 learn_zero_point: bool = False, lsq_grad_scale: bool = True,
                 p: float = 2.4, sample_size: int = 2048, init_method: str = "mse",
                 per_timestep: bool = True) -> None:
        super().__init__()
        self.bits = bits
        self.init_method = init_method  # "mse" (Lp search) or "minmax" (observed range)
        self.per_timestep = per_timestep  # False: every entry starts from the pooled range
        self.symmetric = symmetric
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.context = context
        self.learn_zero_point = learn_zero_point and not symmetric
        self.use_grad_scale = lsq_grad_scale
        self.p = p
        self.sample_size = sample_size
        self.calibrating = False
        self._observers: Dict[float, SampleObserver] = {}
        self.register_buffer("timesteps", torch.zeros(0))
        self.scale = nn.Parameter(torch.ones(0))
        self._set_zero_point(torch.zeros(0))

    @classmethod
    def from_config(cls, cfg: "QuantConfig", *, bits: int, context: TimestepContext,
                    channel_dim: int, group_size: int) -> "TemporalActQuantizer":
        """Per-tensor: the channel dim and group size do not apply."""
        return cls(bits, context, symmetric=cfg.act_symmetric, learn_zero_point=cfg.learn_zero_point,
                   lsq_grad_scale=cfg.lsq_grad_scale, p=cfg.lp_norm, init_method=cfg.act_init,
                   per_timestep=cfg.act_per_timestep)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, timesteps={self.timesteps.numel()}"

    def step_sizes(self) -> nn.Parameter:
        return self.scale

    @torch.no_grad()
    def export_table(self, name: str) -> ActTable:
        """The step sizes and zero points by timestep, as the forward uses them."""
        if self.calibrating or self.timesteps.numel() == 0:
            raise ValueError(f"Cannot export layer '{name}': its activation step sizes are not "
                             f"calibrated (run qdiff.calibrate.calibrate, or finish calibration).")
        return ActTable("per_tensor_per_timestep", self.timesteps.numel(), 0, {
            "timesteps": self.timesteps, "scale": self.scale.detach().clamp_min(1e-8),
            "zero_point": self.zero_point.detach().round()})

    def _set_zero_point(self, value: torch.Tensor) -> None:
        if self.learn_zero_point:
            self.zero_point = nn.Parameter(value)
        else:
            self.register_buffer("zero_point", value)

    @torch.no_grad()
    def set_timesteps(self, timesteps: Union[Sequence[float], torch.Tensor]) -> None:
        """Declare the table's timestep values; existing entries carry over by nearest value."""
        table = torch.as_tensor(timesteps).detach().float().reshape(-1).unique()  # sorted
        table = table.to(self.timesteps.device)
        if self.timesteps.numel():
            index = nearest_index(self.timesteps, table)
            scale, zero_point = self.scale.detach()[index], self.zero_point.detach()[index]
        else:
            scale, zero_point = torch.ones_like(table), torch.zeros_like(table)
        self.timesteps = table
        self.scale = nn.Parameter(scale.to(self.scale.dtype), requires_grad=self.scale.requires_grad)
        self._set_zero_point(zero_point.to(self.zero_point.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        """Resize the table to the checkpoint's before loading (fresh models start empty)."""
        incoming = state_dict.get(prefix + "timesteps")
        if incoming is not None and incoming.shape != self.timesteps.shape:
            self.set_timesteps(incoming)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Initialise every table entry from its nearest observed timestep (Lp search or min-max)."""
        self.calibrating = False
        if not self._observers:
            raise RuntimeError("finish_calibration(): no activations were observed; run the "
                               "model (with a timestep) between start and finish.")
        observed = torch.tensor(sorted(self._observers), dtype=torch.float32)
        if not self.timesteps.numel():
            self.set_timesteps(observed)
        scale, zero_point = self._initial_entries(
            [self._observers[value] for value in observed.tolist()])
        index = nearest_index(observed, self.timesteps).to(self.scale.device)
        self.scale.copy_(scale.to(self.scale.device)[index])
        self.zero_point.copy_(zero_point.to(self.zero_point.device)[index])
        self._observers = {}

    def _initial_entries(self, observers: List[SampleObserver]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Step sizes and zero points, one per observer (timestep), from what they recorded."""
        if not self.per_timestep:  # naive PTQ: one range for the whole trajectory
            low = torch.stack([o.low for o in observers]).amin()
            high = torch.stack([o.high for o in observers]).amax()
            pooled = torch.cat([o.values() for o in observers])
            scale, zero_point = (scale_from_range(low, high, self.qmin, self.qmax, self.symmetric)
                                 if self.init_method == "minmax" else
                                 lp_search_init(pooled, self.qmin, self.qmax, self.symmetric, self.p))
            return scale.expand(len(observers)), zero_point.expand(len(observers))
        if self.init_method == "minmax":
            low, high = torch.stack([o.low for o in observers]), torch.stack([o.high for o in observers])
            return scale_from_range(low, high, self.qmin, self.qmax, self.symmetric)
        # one search for all timesteps: a row per timestep (short samples cycle to equal length)
        samples = [observer.values() for observer in observers]
        width = max(sample.numel() for sample in samples)
        rows = torch.stack([s[torch.arange(width, device=s.device) % s.numel()] for s in samples])
        return lp_search_init(rows, self.qmin, self.qmax, self.symmetric, self.p, channel_dim=0)

    def _timesteps_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        timesteps = self.context.per_sample(x.shape[0])
        if timesteps is None and self.timesteps.numel() != 1:
            raise RuntimeError("No timestep is set: call the denoiser root (its pre-hook records "
                               "the `timestep` argument) or use `context.use(t)`.")
        return timesteps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        timesteps = self._timesteps_for(x)
        if self.calibrating:
            keys = timesteps if timesteps is not None else torch.zeros(x.shape[0])
            self._observe_by_key(x, keys, row_width=-1)
            return x
        if not self.timesteps.numel():
            raise RuntimeError("Activation quantizer is not calibrated: run calibration or "
                               "set_timesteps() first.")
        index = (nearest_index(self.timesteps, timesteps) if timesteps is not None
                 else torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        scale, zero_point = self.scale, self.zero_point
        if self.use_grad_scale:
            g = lsq_gradient_factor(x[0].numel(), self.qmax)
            scale = grad_scale(scale, g)
            zero_point = grad_scale(zero_point, g) if self.learn_zero_point else zero_point
        shape = (-1,) + (1,) * (x.dim() - 1)
        scale = scale.clamp_min(1e-8)[index].view(shape).to(x.dtype)
        zero_point = zero_point[index].view(shape).to(x.dtype)
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax)
