"""Adding an activation quantizer is one new class plus `register_act_quantizer`.

The toy mode below lives in this file only: a per-tensor quantizer with one learned
step size for every timestep, set from the calibration range. Nothing else in qdiff
names it, yet `QuantConfig` accepts its mode, `quantize_` builds it, calibration and
training reach it, and the export freezes it into the existing per-timestep table
(one entry) because its `export_table` says so.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdiff.config import ConfigError, LoRAConfig, QuantConfig
from qdiff.export.freeze import freeze_layer, layer_spec
from qdiff.quant import (ActQuantizer, ActTable, QuantLinear, act_modes, act_param_groups,
                         act_quantizer_class, calibrating, fake_quantize, int_range,
                         iter_quant_layers, nonpositive_step_tables, quant_parameters, quantize_,
                         TimestepContext, register_act_quantizer, set_timesteps,
                         unregister_act_quantizer)
from qdiff.quant.primitives import scale_from_range

pytestmark = pytest.mark.usefixtures("one_thread")

MODE = "test_static_per_tensor"


class StaticActQuantizer(ActQuantizer):
    """One step size and zero point for the whole trajectory (naive PTQ, then LSQ)."""

    def __init__(self, bits: int, *, symmetric: bool) -> None:
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.scale = nn.Parameter(torch.ones(1))
        self.register_buffer("zero_point", torch.zeros(1))
        self.low = self.high = None

    @classmethod
    def from_config(cls, cfg, *, bits, context, channel_dim, group_size):
        return cls(bits, symmetric=cfg.act_symmetric)

    def start_calibration(self) -> None:
        super().start_calibration()
        self.low = self.high = None

    @property
    def has_observations(self) -> bool:
        return self.low is not None

    @torch.no_grad()
    def finish_calibration(self) -> None:
        super().finish_calibration()
        scale, zero_point = scale_from_range(self.low, self.high, self.qmin, self.qmax, self.symmetric)
        self.scale.copy_(scale.reshape(1))
        self.zero_point.copy_(zero_point.reshape(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            low, high = x.detach().min().float(), x.detach().max().float()
            self.low = low if self.low is None else torch.minimum(self.low, low)
            self.high = high if self.high is None else torch.maximum(self.high, high)
            return x
        return fake_quantize(x, self.scale.clamp_min(1e-8).to(x.dtype), self.zero_point.to(x.dtype),
                             self.qmin, self.qmax)

    def step_sizes(self) -> nn.Parameter:
        return self.scale

    def export_table(self, name: str) -> ActTable:
        return ActTable("per_tensor_per_timestep", 1, 0, {
            "timesteps": torch.zeros(1), "scale": self.scale.detach().clamp_min(1e-8),
            "zero_point": self.zero_point.round()})


@pytest.fixture
def static_mode():
    before = act_modes()
    register_act_quantizer(MODE)(StaticActQuantizer)
    yield MODE
    unregister_act_quantizer(MODE)
    assert act_modes() == before


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def test_the_built_in_modes_are_registered_in_order_with_their_classes():
    assert act_modes()[:2] == ("temporal", "dynamic_per_token")
    assert [act_quantizer_class(mode).mode for mode in act_modes()[:2]] == ["temporal", "dynamic_per_token"]
    assert act_quantizer_class("dynamic_per_token").channel_groups
    assert not act_quantizer_class("temporal").channel_groups


def test_a_registered_mode_is_allowed_by_the_config_and_unregistering_refuses_it_again(static_mode):
    assert act_modes()[-1] == static_mode
    assert QuantConfig(act_mode=static_mode).act_mode == static_mode
    with pytest.raises(ConfigError, match=f"choose one of .*'{static_mode}'"):
        QuantConfig(act_mode="nope")
    with pytest.raises(ConfigError, match="act_group_size=4 needs quant.act_mode=dynamic_per_token"):
        QuantConfig(act_mode=static_mode, act_group_size=4)
    unregister_act_quantizer(static_mode)
    try:
        with pytest.raises(ConfigError, match=f"'{static_mode}' is not allowed; choose one of "
                                              r"\['temporal', 'dynamic_per_token'\]"):
            QuantConfig(act_mode=static_mode)
    finally:
        register_act_quantizer(static_mode)(StaticActQuantizer)


def test_registration_refuses_a_taken_mode_and_a_class_that_is_not_a_quantizer(static_mode):
    with pytest.raises(ValueError, match=f"'{static_mode}' is taken by StaticActQuantizer"):
        register_act_quantizer(static_mode)(StaticActQuantizer)
    with pytest.raises(TypeError, match="decorates an ActQuantizer subclass"):
        register_act_quantizer("other")(nn.Identity)
    assert "other" not in act_modes()


def test_a_registered_mode_quantizes_calibrates_and_trains(static_mode):
    model = _model()
    x = torch.randn(4, 16)
    reference = model(x).detach()
    quantize_(model, QuantConfig(weight_bits=8, act_bits=8, act_mode=static_mode), LoRAConfig(rank=2))
    layers = dict(iter_quant_layers(model))
    assert sorted(layers) == ["0", "2"]
    assert all(type(layer.act_quantizer) is StaticActQuantizer for layer in layers.values())
    with calibrating(model):
        model(x)
    set_timesteps(model, [1.0, 500.0])  # no table: nothing to declare
    assert all(float(layer.act_quantizer.scale.detach()) > 0 for layer in layers.values())
    out = model(x)
    error = ((out - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.05
    out.square().mean().backward()
    for layer in layers.values():
        assert layer.act_quantizer.scale.grad is not None and layer.act_quantizer.scale.grad.abs() > 0
        assert layer.lora_B.grad is not None
    params = quant_parameters(model)
    assert {id(p) for p in params.act_scales} == {id(layer.act_quantizer.scale) for layer in layers.values()}
    groups = act_param_groups(model, 1e-3, scale_aware=True)
    assert sorted(group["name"] for group in groups) == ["act_scale:0.act_quantizer",
                                                         "act_scale:2.act_quantizer", "act_scales"]
    assert nonpositive_step_tables(model) == []


def test_a_registered_mode_exports_through_its_table(static_mode):
    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(16, 8), 4, 4, QuantConfig(act_mode=static_mode))
    x = torch.randn(3, 16)
    with calibrating(layer):
        layer(x)
    spec = layer_spec("layer", layer)
    assert (spec.act_granularity, spec.act_table_size, spec.act_group_size) == ("per_tensor_per_timestep", 1, 0)
    int_layer = freeze_layer("layer", layer, TimestepContext())
    with torch.no_grad():
        torch.testing.assert_close(int_layer(x), layer(x), rtol=1e-5, atol=1e-5)


def test_a_quantizer_without_an_export_table_is_refused_by_name():
    class NoExport(StaticActQuantizer):
        def export_table(self, name: str) -> ActTable:
            return ActQuantizer.export_table(self, name)

    register_act_quantizer("test_no_export")(NoExport)
    try:
        layer = QuantLinear.from_module(nn.Linear(4, 4), 8, 8, QuantConfig(act_mode="test_no_export"))
        with pytest.raises(ValueError, match="layer 'blocks.0'.*NoExport .*quant.act_mode='test_no_export'"):
            layer_spec("blocks.0", layer)
    finally:
        unregister_act_quantizer("test_no_export")
