"""Adding a weight quantizer is one new class plus `register_weight_quantizer`.

The toy mode below lives in this file only: one learned step size for the whole weight
on a symmetric grid. Nothing else in qdiff names it, yet `QuantConfig` accepts its mode,
`quantize_` builds it, training and the low-rank backward reach it, the packed base
weight keeps its grid and the export stores it in the existing per-channel format (its
step size repeated per output channel) because its `export_params` says so.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qdiff.config import ConfigError, LoRAConfig, QuantConfig
from qdiff.export.freeze import freeze_layer, layer_spec
from qdiff.quant import (LSQWeightQuantizer, QuantLinear, TimestepContext, UnknownWeightModeError,
                         WeightQuantizer, calibrating, iter_quant_layers, mean_weight_steps,
                         quant_parameters, quantize_, register_weight_quantizer,
                         unregister_weight_quantizer, weight_modes, weight_quantizer_class)
from qdiff.quant.primitives import init_scale

pytestmark = pytest.mark.usefixtures("one_thread")

MODE = "test_per_tensor"


class PerTensorWeightQuantizer(WeightQuantizer):
    """One step size for the whole weight, symmetric whatever `quant.weight_symmetric` says."""

    def __init__(self, out_channels: int, bits: int) -> None:
        super().__init__(bits=bits, symmetric=True)
        self.out_channels = out_channels
        self.scale = nn.Parameter(torch.ones(1))

    @classmethod
    def from_config(cls, cfg, *, out_channels, bits):
        return cls(out_channels, bits)

    @torch.no_grad()
    def init_from(self, weight, method="mse", p=2.4):
        scale, _ = init_scale(weight, self.qmin, self.qmax, self.symmetric, method, p)
        self.scale.copy_(scale.reshape(1))

    def grid(self, weight):
        scale = self.scale.clamp_min(1e-8).view((1,) * weight.dim())
        return scale, torch.zeros_like(scale)

    def export_params(self):
        scale = self.scale.detach().float().clamp_min(1e-8).expand(self.out_channels).clone()
        return scale, torch.zeros_like(scale)


@pytest.fixture
def per_tensor_mode():
    before = weight_modes()
    register_weight_quantizer(MODE)(PerTensorWeightQuantizer)
    yield MODE
    unregister_weight_quantizer(MODE)
    assert weight_modes() == before


def _cfg(**changes) -> QuantConfig:
    """W4A8 in the registered mode; one activation clipping ratio (no timestep needed)."""
    return QuantConfig(weight_bits=4, act_bits=8, act_mode="dynamic_per_token", act_timestep_groups=1,
                       weight_mode=MODE, **changes)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))


def test_the_built_in_mode_is_the_default():
    assert weight_modes()[0] == "per_channel"
    assert weight_quantizer_class("per_channel") is LSQWeightQuantizer
    assert LSQWeightQuantizer.mode == "per_channel"
    assert QuantConfig().weight_mode == "per_channel"
    layer = QuantLinear.from_module(nn.Linear(4, 3), 4, 8, QuantConfig())
    assert type(layer.weight_quantizer) is LSQWeightQuantizer
    with pytest.raises(UnknownWeightModeError, match=r"quant.weight_mode='nope' is not registered"):
        weight_quantizer_class("nope")


def test_an_unknown_mode_is_refused_naming_the_closest_registered_one(per_tensor_mode):
    assert weight_modes()[-1] == per_tensor_mode
    assert QuantConfig(weight_mode=per_tensor_mode).weight_mode == per_tensor_mode
    with pytest.raises(ConfigError, match=r"quant.weight_mode='per_chanel' is not allowed; choose one "
                                          r"of \['per_channel', 'test_per_tensor'\]. Did you mean "
                                          r"'per_channel'\?"):
        QuantConfig(weight_mode="per_chanel")
    with pytest.raises(ConfigError, match=r"Did you mean 'test_per_tensor'\?"):
        QuantConfig(weight_mode="per_tensor")
    unregister_weight_quantizer(per_tensor_mode)
    try:
        with pytest.raises(ConfigError, match=rf"'{per_tensor_mode}' is not allowed; choose one of "
                                              r"\['per_channel'\]"):
            QuantConfig(weight_mode=per_tensor_mode)
    finally:
        register_weight_quantizer(per_tensor_mode)(PerTensorWeightQuantizer)


def test_registration_refuses_a_taken_mode_and_a_class_that_is_not_a_quantizer(per_tensor_mode):
    with pytest.raises(ValueError, match=f"'{per_tensor_mode}' is taken by PerTensorWeightQuantizer"):
        register_weight_quantizer(per_tensor_mode)(PerTensorWeightQuantizer)
    with pytest.raises(TypeError, match="decorates an? WeightQuantizer subclass"):
        register_weight_quantizer("other")(nn.Identity)
    assert "other" not in weight_modes()


def test_quantize_builds_the_mode_of_the_config_and_it_trains(per_tensor_mode):
    model = _model()
    x = torch.randn(4, 16)
    reference = model(x).detach()
    quantize_(model, _cfg(), LoRAConfig(rank=2))
    layers = dict(iter_quant_layers(model))
    assert sorted(layers) == ["0", "2"]
    assert all(type(layer.weight_quantizer) is PerTensorWeightQuantizer for layer in layers.values())
    for layer in layers.values():  # one grid for the whole weight: at most 16 values at 4 bits
        assert layer.quantized_weight().unique().numel() <= 16
    with calibrating(model):
        model(x)
    out = model(x)
    error = ((out - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.2
    out.square().mean().backward()
    for layer in layers.values():
        assert layer.weight_quantizer.scale.grad.abs() > 0
        assert layer.lora_B.grad is not None
    params = quant_parameters(model)
    assert {id(p) for p in params.weight_scales} == {id(layer.weight_quantizer.scale)
                                                     for layer in layers.values()}
    assert mean_weight_steps(model) == pytest.approx(
        {name: float(layer.weight_quantizer.scale.detach()) for name, layer in layers.items()})


def test_the_mode_exports_through_its_per_channel_params(per_tensor_mode):
    torch.manual_seed(0)
    cfg = _cfg(weight_symmetric=False)
    layer = QuantLinear.from_module(nn.Linear(16, 8), 4, 8, cfg, LoRAConfig(rank=2))
    nn.init.normal_(layer.lora_B, std=0.05)  # LoRA that matters: the export merges it
    x = torch.randn(3, 16)
    with calibrating(layer):
        layer(x)
    assert layer_spec("layer", layer).weight_symmetric  # the quantizer's, not the config's
    int_layer = freeze_layer("layer", layer, TimestepContext())
    scale = int_layer.weight_scale
    assert scale.shape == (8,) and torch.equal(scale, scale[:1].expand(8))
    assert not int_layer.weight_zero_point.any()
    with torch.no_grad():
        torch.testing.assert_close(int_layer(x), layer(x), rtol=1e-5, atol=1e-5)


def test_the_packed_base_keeps_the_modes_grid(per_tensor_mode):
    torch.manual_seed(0)
    module = nn.Linear(16, 8)
    weight = module.weight.detach().clone()
    cfg = _cfg(packed_base_weight=True)
    layer = QuantLinear.from_module(module, 4, 8, cfg, LoRAConfig(rank=2))
    assert torch.equal(layer.base_scale, layer.weight_quantizer.export_params()[0])
    torch.testing.assert_close(layer.base_weight(), layer.weight_quantizer(weight).detach(),
                               rtol=0, atol=1e-6)


def test_the_low_rank_backward_reaches_the_mode(per_tensor_mode):
    torch.manual_seed(0)
    cfg = _cfg()
    fast = QuantLinear.from_module(nn.Linear(16, 8), 4, 8, cfg, LoRAConfig(rank=2, low_rank_backward=True))
    nn.init.normal_(fast.lora_B, std=0.05)
    fast.weight_quantizer.requires_grad_(False)  # trained step sizes need the full weight gradient
    x = torch.randn(5, 16)
    with calibrating(fast):
        fast(x)
    slow = copy.deepcopy(fast)
    slow.low_rank_backward = False
    assert fast._uses_low_rank_backward() and not slow._uses_low_rank_backward()
    for layer in (fast, slow):
        layer(x).square().sum().backward()
    torch.testing.assert_close(fast.lora_A.grad, slow.lora_A.grad)
    torch.testing.assert_close(fast.lora_B.grad, slow.lora_B.grad)
