"""Activation quantization of the exported model: inputs -> integer codes + step sizes.

These are the inference halves of the student's activation quantizers: the same
arithmetic in the same order (`clamp(x / s + zp, qmin, qmax)`, rounded), so on the same
input the codes are the student's (its LSQ gradient scaling can move its step size by
one ulp, which matters only for a value within an ulp of a rounding boundary), but they
return the codes instead of multiplying them back, and hold frozen tables (buffers)
rather than trainable parameters. The step size is
selected exactly as the student selects it: by the timestep value that the denoiser
root's pre-hook recorded in the shared `TimestepContext`, nearest table entry.

Per call a layer's own work is small, so the lookup is kept off the hot path: the
context finds the nearest entry once per call for all layers that share a table, and
where all samples share it (one timestep per batch, as samplers call) each layer reuses
its entry's (scale, zero point) tensors, made once per entry, dtype and device.

Each codes module computes one `act_granularity` of the format and is registered under
it (`register_act_codes`): the loader builds the module a layer's spec names, and the
freeze loads the student quantizer's `ActQuantizer.export_table` into it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Hashable, Mapping, NamedTuple, Optional, TypeVar

import torch

from qdiff.quant.primitives import grid_codes, int_range, per_token_grid
from qdiff.quant.timestep_context import TimestepContext, nearest_index
from qdiff.registry import ClassRegistry

from .fixed_dtype import FixedDtypeBuffers

if TYPE_CHECKING:
    from .format import LayerSpec


class ActCodes(NamedTuple):
    """Integer-valued codes shaped like the input, and the grid they live on.

    `scale` and `zero_point` broadcast against `codes` (one entry per sample, or per
    token with the channel dim of size 1); `x ~ (codes - zero_point) * scale`.
    """

    codes: torch.Tensor
    zero_point: torch.Tensor
    scale: torch.Tensor


class ActCodesModule(FixedDtypeBuffers):
    """Base of the exported layers' activation modules: `forward(x)` gives `ActCodes`.

    `granularity` is the format's `act_granularity` it computes (set by
    `register_act_codes`); its buffers are the table that `load_table` fills.
    """

    granularity: ClassVar[str] = ""
    channel_groups: ClassVar[bool] = False  # whether a spec may give it `act_group_size` > 0
    one_grid_per_sample: ClassVar[bool] = False  # a convolution then has an integer form
    qmin: int
    qmax: int

    @classmethod
    def from_spec(cls, spec: "LayerSpec", context: TimestepContext, channel_dim: int) -> "ActCodesModule":
        """An empty (not yet loaded) module for a layer of `spec`; `channel_dim` is the
        input's feature dim (-1 for Linear, 1 for convolutions)."""
        raise NotImplementedError

    @torch.no_grad()
    def load_table(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy a frozen table (`ActTable.tensors`: buffer name -> values) into the buffers."""
        for name, value in tensors.items():
            getattr(self, name).copy_(value)

    def zero_points_on_grid(self) -> bool:
        """Whether every zero point it can produce lies in [qmin, qmax] (true by default:
        a zero point derived from a range, as per-token grids do, lies there)."""
        return True

    def forward(self, x: torch.Tensor) -> ActCodes:  # pragma: no cover - abstract
        raise NotImplementedError

    def shared_grid(self, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(scale, zero point) as 0-d tensors in `x`'s dtype when one grid serves the whole
        call, else None (default: grids vary per token). Fused kernels quantize with it."""
        return None


C = TypeVar("C", bound=type)
ACT_CODES = ClassRegistry("Activation granularity", ActCodesModule, "granularity")
"""The format's `act_granularity` values -> the `ActCodesModule` that computes each."""


def register_act_codes(granularity: str) -> Callable[[C], C]:
    """Class decorator: the format's `act_granularity: granularity` loads into this
    `ActCodesModule` subclass."""
    return ACT_CODES.register(granularity)


def unregister_act_codes(granularity: str) -> None:
    """Remove a registered granularity (files naming it are refused from then on)."""
    ACT_CODES.unregister(granularity)


@register_act_codes("per_tensor_per_timestep")
class TimestepActCodes(ActCodesModule):
    """Per-tensor step size and zero point looked up by timestep (temporal LSQ, frozen)."""

    one_grid_per_sample = True

    def __init__(self, bits: int, symmetric: bool, table_size: int,
                 context: Optional[TimestepContext] = None) -> None:
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.context = context or TimestepContext()
        self.register_buffer("timesteps", torch.zeros(table_size))
        self.register_buffer("scale", torch.ones(table_size))
        self.register_buffer("zero_point", torch.zeros(table_size))
        self._forget_entries()

    @classmethod
    def from_spec(cls, spec: "LayerSpec", context: TimestepContext, channel_dim: int) -> "TimestepActCodes":
        return cls(spec.act_bits, spec.act_symmetric, spec.act_table_size, context)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, timesteps={self.timesteps.numel()}"

    def zero_points_on_grid(self) -> bool:
        """A table entry off the grid (a learned zero point) is possible."""
        return bool(((self.zero_point >= self.qmin) & (self.zero_point <= self.qmax)).all())

    def forward(self, x: torch.Tensor) -> ActCodes:
        scale, zero_point = self.grid(x)
        return ActCodes(grid_codes(x, scale, zero_point, self.qmin, self.qmax), zero_point, scale)

    def grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) of each sample, shaped (B, 1, ...) like `x`, in `x`'s dtype
        (possibly views of tensors this module reuses: do not modify them)."""
        index = None if torch.compiler.is_compiling() else self._shared_index(x.shape[0])
        if index is None:
            return self._lookup(x)
        scale, zero_point = self._entry(index, x, x.dim())
        rows = (x.shape[0],) + (1,) * (x.dim() - 1)
        return scale.expand(rows), zero_point.expand(rows)

    def shared_grid(self, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The table entry of every sample, as 0-d tensors, when they all share one."""
        index = None if torch.compiler.is_compiling() else self._shared_index(x.shape[0])
        return None if index is None else self._entry(index, x, 0)

    def _shared_index(self, rows: int) -> Optional[int]:
        """The table entry of every row, when they all share one (else None)."""
        if self.context.timesteps is None:
            return 0 if self.timesteps.numel() == 1 else None  # None: `_lookup` says what is missing
        index = self.context.nearest(self.timesteps, self._table_key())
        if len(set(index)) > 1 or rows % len(index):  # per-sample entries, or a batch `_lookup` checks
            return None
        return index[0]

    def _table_key(self) -> Hashable:
        if self._key is None:
            self._key = tuple(self.timesteps.tolist())
        return self._key

    def _entry(self, index: int, x: torch.Tensor, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Table entry `index` as (1,) * `dims`-shaped tensors in `x`'s dtype, device and
        inference mode."""
        key = (index, dims, x.dtype, x.device, torch.is_inference_mode_enabled())
        entry = self._entries.get(key)
        if entry is None:
            shape = (1,) * dims
            entry = self._entries[key] = (self.scale[index].view(shape).to(x.device, x.dtype),
                                          self.zero_point[index].view(shape).to(x.device, x.dtype))
        return entry

    def _lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lookup itself, per row (any batch; and what `torch.compile` traces)."""
        timesteps = self.context.per_sample(x.shape[0])
        if timesteps is None:
            if self.timesteps.numel() != 1:
                raise RuntimeError("No timestep is set: call the denoiser itself (its pre-hook "
                                   "records the `timestep` argument) or use `context.use(t)`.")
            index = torch.zeros(x.shape[0], dtype=torch.long, device=self.timesteps.device)
        else:
            index = nearest_index(self.timesteps, timesteps)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return self.scale[index].view(shape).to(x.dtype), self.zero_point[index].view(shape).to(x.dtype)

    def _forget_entries(self) -> None:
        self._key: Optional[Hashable] = None
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _load_from_state_dict(self, *args) -> None:
        self._forget_entries()
        super()._load_from_state_dict(*args)

    def _apply(self, fn, recurse: bool = True):
        self._forget_entries()
        return super()._apply(fn, recurse)


@register_act_codes("per_token")
class TokenActCodes(ActCodesModule):
    """Per-token grid from each token's clipped range; the clip ratio by timestep group.

    With `group_size` > 0 each token has one grid per that many consecutive channels (the
    student's `DynamicActQuantizer(group_size=...)`); `scale` and `zero_point` then have
    the shape of the input, one value per channel (those of its group).
    """

    channel_groups = True

    def __init__(self, bits: int, symmetric: bool, num_groups: int, channel_dim: int,
                 context: Optional[TimestepContext] = None, group_size: int = 0) -> None:
        super().__init__()
        self.bits, self.symmetric, self.channel_dim = bits, symmetric, channel_dim
        self.group_size = group_size
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.context = context or TimestepContext()
        self.register_buffer("clip_ratio", torch.ones(num_groups))
        self.register_buffer("group_edges", torch.zeros(max(num_groups - 1, 0)))

    @classmethod
    def from_spec(cls, spec: "LayerSpec", context: TimestepContext, channel_dim: int) -> "TokenActCodes":
        return cls(spec.act_bits, spec.act_symmetric, spec.act_table_size, channel_dim, context,
                   spec.act_group_size)

    def extra_repr(self) -> str:
        grouping = f", group_size={self.group_size}" if self.group_size else ""
        return f"bits={self.bits}, symmetric={self.symmetric}, groups={self.clip_ratio.numel()}{grouping}"

    def _ratio(self, x: torch.Tensor) -> torch.Tensor:
        timesteps = self.context.per_sample(x.shape[0])
        if timesteps is None:
            if self.clip_ratio.numel() != 1:
                raise RuntimeError("No timestep is set: call the denoiser itself or use `context.use(t)`.")
            groups = torch.zeros(x.shape[0], dtype=torch.long, device=self.clip_ratio.device)
        else:
            edges = self.group_edges
            groups = torch.bucketize(timesteps.to(edges.device).contiguous(), edges, right=True)
        return self.clip_ratio[groups].view((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> ActCodes:
        if not self.group_size:
            scale, zero_point = self.grid(x)
            return ActCodes(grid_codes(x, scale, zero_point, self.qmin, self.qmax), zero_point, scale)
        groups = x.movedim(self.channel_dim, -1).unflatten(-1, (-1, self.group_size))
        scale, zero_point = per_token_grid(groups, self._ratio(groups), self.qmin, self.qmax,
                                           self.symmetric)
        codes = grid_codes(groups, scale, zero_point, self.qmin, self.qmax)
        scale, zero_point = (t.expand_as(groups) for t in (scale, zero_point))
        return ActCodes(*(t.flatten(-2).movedim(-1, self.channel_dim)
                          for t in (codes, zero_point, scale)))

    def grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) of each token, shaped like `x` with a channel dim of size 1
        (one grid per token: `group_size` 0)."""
        tokens = x.movedim(self.channel_dim, -1)
        scale, zero_point = per_token_grid(tokens, self._ratio(x), self.qmin, self.qmax,
                                           self.symmetric)
        return scale.movedim(-1, self.channel_dim), zero_point.movedim(-1, self.channel_dim)


def centres_codes(act: ActCodesModule) -> bool:
    """Whether `code - zp` fits int8 for every grid the module can produce (the fast
    kernels' activation operand then needs no zero-point term; see `qdiff.kernels.int8_acts`)."""
    return act.qmax - act.qmin <= 127 and act.zero_points_on_grid()
