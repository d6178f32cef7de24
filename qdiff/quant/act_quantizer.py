"""The activation-quantizer protocol and the registry keyed by `QuantConfig.act_mode`.

A quantized layer fake-quantizes its input with one activation quantizer; the layer,
the model-wide helpers (`model_ops`) and the export (`qdiff.export.freeze`) ask it
through this protocol only, so a new kind of activation quantization is one new file:

    @register_act_quantizer("my_mode")
    class MyActQuantizer(ActQuantizer):
        @classmethod
        def from_config(cls, cfg, *, bits, context, channel_dim, group_size): ...
        def forward(self, x): ...        # x fake-quantized (x itself while calibrating)

and `quant.act_mode: my_mode` selects it (`QuantConfig` checks the mode against this
registry). Calibration, a timestep table and an export table are optional: the defaults
below say "none". To export, `export_table` names a granularity that a codes module in
`qdiff.export.act_codes` computes (`register_act_codes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Mapping, NamedTuple, Optional, Sequence, TypeVar, Union

import torch
from torch import nn

from qdiff.errors import QdiffError
from qdiff.registry import ClassRegistry

from .timestep_context import TimestepContext

if TYPE_CHECKING:
    from qdiff.config import QuantConfig


class ActTable(NamedTuple):
    """What a calibrated activation quantizer freezes into: the export's `act_granularity`,
    the table size (`act_table_size`), the channel group size (`act_group_size`) and the
    tensors that the codes module of that granularity loads (by buffer name)."""

    granularity: str
    size: int
    group_size: int
    tensors: Mapping[str, torch.Tensor]


class ActQuantizer(nn.Module):
    """Base of the activation fake-quantizers (one per quantized layer input, or per slice).

    Subclasses set `bits`, `symmetric` (and `group_size` when they take channel groups)
    and implement `from_config` and `forward`; the other methods have defaults for a
    quantizer without calibration, timestep table or export.
    """

    mode: ClassVar[str] = ""  # its `quant.act_mode`, set by `register_act_quantizer`
    channel_groups: ClassVar[bool] = False  # whether it takes `quant.act_group_size`
    bits: int
    symmetric: bool
    group_size: int = 0  # channels per grid within a token; 0: none
    calibrating: bool = False

    @classmethod
    def from_config(cls, cfg: "QuantConfig", *, bits: int, context: TimestepContext,
                    channel_dim: int, group_size: int) -> "ActQuantizer":
        """The quantizer of one layer input: `bits` (the layer's, after overrides), the
        shared timestep `context`, the input's feature dim and its channel group size
        (0 unless the class takes `channel_groups`); the rest comes from `cfg`."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def start_calibration(self) -> None:
        """Inputs pass through unquantized from now on, and are observed."""
        self.calibrating = True

    @property
    def has_observations(self) -> bool:
        """Whether calibration saw an input (an unreached quantizer is left as it was)."""
        return False

    def finish_calibration(self) -> None:
        """Initialise the quantizer from what was observed, and quantize again."""
        self.calibrating = False

    def stop_calibration(self) -> None:
        """Quantize again without changing anything (calibration never reached it)."""
        self.calibrating = False

    def set_timesteps(self, timesteps: Union[Sequence[float], torch.Tensor]) -> None:
        """Declare the timestep values of its table (nothing to do without one)."""

    def step_sizes(self) -> Optional[nn.Parameter]:
        """Its trainable table of per-tensor step sizes, one per entry, or None: what the
        scale-aware learning rate follows and what must stay positive."""
        return None

    def export_table(self, name: str) -> ActTable:
        """The frozen table the export stores for it; ValueError (naming layer `name`)
        when it cannot be exported, e.g. before calibration."""
        raise ValueError(f"Cannot export layer '{name}': its activation quantizer "
                         f"{type(self).__name__} (quant.act_mode={self.mode!r}) has no export "
                         f"table; see docs/extending/add-a-quantizer.md.")


class UnknownActModeError(QdiffError, ValueError):
    """A `quant.act_mode` that no activation quantizer is registered under."""


Q = TypeVar("Q", bound=type)
_ACT_QUANTIZERS = ClassRegistry("Activation mode", ActQuantizer, "mode", key="quant.act_mode",
                                unknown=UnknownActModeError)


def register_act_quantizer(mode: str) -> Callable[[Q], Q]:
    """Class decorator: `quant.act_mode: mode` builds this `ActQuantizer` subclass."""
    return _ACT_QUANTIZERS.register(mode)


def unregister_act_quantizer(mode: str) -> None:
    """Remove a registered mode (configs naming it are refused from then on)."""
    _ACT_QUANTIZERS.unregister(mode)


def act_modes() -> tuple[str, ...]:
    """The registered `quant.act_mode` values, in registration order."""
    return tuple(_ACT_QUANTIZERS)


def act_quantizer_class(mode: str) -> type:
    """The `ActQuantizer` subclass registered under `mode`."""
    return _ACT_QUANTIZERS.lookup(mode)
