"""Per-token activations quantized in channel groups (quant.act_group_size): the grid of each
group, what it buys against a loud channel, refusals, and the exported integer layer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from qdiff.config import ConfigError, LoRAConfig, QuantConfig
from qdiff.export.format import ExportFormatError, LayerSpec
from qdiff.export.freeze import empty_int_layer, freeze_layer, layer_spec, weight_codes
from qdiff.export.int_layers import IntLayer
from qdiff.export.split_layer import SplitIntLayer
from qdiff.quant import DynamicActQuantizer, QuantConv2d, QuantLinear, TimestepContext, calibrating

from test_quant_split import assert_reproduces

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(channels: int, loud_channel: int = 3, seed: int = 0) -> torch.Tensor:
    """(2, 5, channels) tokens, one channel 50x louder than the rest (as DiT FFN inputs)."""
    x = torch.randn(2, 5, channels, generator=torch.Generator().manual_seed(seed))
    x[..., loud_channel] *= 50.0
    return x


@pytest.mark.parametrize("symmetric", [False, True])
def test_each_group_is_quantized_as_a_token_of_its_own(symmetric):
    """The grouped quantizer equals the ungrouped one applied to every group alone."""
    context = TimestepContext()
    grouped = DynamicActQuantizer(4, context, symmetric=symmetric, num_groups=2, group_size=8)
    whole = DynamicActQuantizer(4, context, symmetric=symmetric, num_groups=2)
    with torch.no_grad():
        for quantizer in (grouped, whole):
            quantizer.clip_ratio.copy_(torch.tensor([0.9, 0.7]))
    x = _tokens(32)
    with torch.no_grad(), context.use(torch.tensor([100, 900])):
        got = grouped(x)
        expected = torch.cat([whole(piece) for piece in x.split(8, dim=-1)], dim=-1)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_loud_channel_coarsens_its_own_group_only():
    context = TimestepContext()
    x = _tokens(32)
    errors = {}
    for group_size in (0, 8):
        quantizer = DynamicActQuantizer(4, context, num_groups=1, group_size=group_size)
        with torch.no_grad():
            errors[group_size] = ((quantizer(x) - x)[..., 8:].abs().mean() / x[..., 8:].abs().mean()).item()
    assert errors[0] > 0.5  # one grid per token: the quiet channels round to a level or two
    assert errors[8] < 0.1


def test_grouped_clip_ratio_gets_a_gradient_and_calibration_searches_it():
    context = TimestepContext()
    layer = QuantLinear.from_module(nn.Linear(32, 8), 4, 4,
                                    QuantConfig(act_mode="dynamic_per_token", act_timestep_groups=1,
                                                act_group_size=8), LoRAConfig(rank=2), None, context)
    assert layer.act_quantizer.group_size == 8
    with torch.no_grad(), calibrating(layer):
        layer(_tokens(32))
    assert layer.act_quantizer.clip_ratio.item() < 1.0  # the Lp search clips the grouped ranges
    layer(_tokens(32, seed=1)).square().sum().backward()
    assert layer.act_quantizer.clip_ratio.grad.abs().sum() > 0


@pytest.mark.parametrize("build, message", [
    (lambda cfg: QuantLinear.from_module(nn.Linear(24, 8), 4, 4, cfg),
     r"24-channel input of Linear.* groups of quant.act_group_size=16: 24 is not a multiple"),
    (lambda cfg: QuantConv2d.from_module(nn.Conv2d(32, 8, 1, groups=2), 4, 4, cfg),
     r"grouped Conv2d.* \(quant.exclude\) or set act_group_size=0"),
])
def test_inputs_that_cannot_be_grouped_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build(QuantConfig(act_mode="dynamic_per_token", act_group_size=16))


def test_narrow_inputs_keep_one_grid_and_temporal_mode_refuses_groups():
    cfg = QuantConfig(act_mode="dynamic_per_token", act_group_size=16)
    assert QuantLinear.from_module(nn.Linear(12, 8), 4, 4, cfg).act_quantizer.group_size == 0
    with pytest.raises(ConfigError, match="act_group_size=16 needs quant.act_mode=dynamic_per_token"):
        QuantConfig(act_group_size=16)


MODULES = {
    "linear": (lambda: nn.Linear(32, 16), []),
    "linear-rotated": (lambda: nn.Linear(32, 16), ["layer"]),
    "conv1x1": (lambda: nn.Conv2d(16, 8, 1), []),
}


def _grouped_student(kind: str) -> tuple[nn.Module, TimestepContext]:
    build, rotate = MODULES[kind]
    cfg = QuantConfig(act_mode="dynamic_per_token", act_timestep_groups=3, act_group_size=8)
    context = TimestepContext()
    module = build()
    cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
    layer = cls.from_module(module, 4, 4, cfg, LoRAConfig(rank=2), None, context, bool(rotate))
    nn.init.normal_(layer.lora_B, std=0.05)
    with torch.no_grad(), calibrating(layer):
        for t in (900, 100):
            with context.use(t):
                layer(_input(layer))
    return layer, context


def _input(layer: nn.Module, seed: int = 0) -> torch.Tensor:
    x = _tokens(layer.weight_shape[1], seed=seed)
    return x if isinstance(layer, QuantLinear) else x.permute(0, 2, 1).reshape(2, -1, 5, 1)


@pytest.mark.parametrize("kind", MODULES)
def test_grouped_integer_layer_reproduces_the_student_layer(kind):
    """One integer layer with the layer's one clip-ratio table; a rotated input is rotated
    before its groups are quantized, as the student does."""
    torch.manual_seed(0)
    layer, context = _grouped_student(kind)
    export_context = TimestepContext()
    int_layer = freeze_layer("layer", layer, export_context)
    assert isinstance(int_layer, IntLayer) and int_layer.spec.act_group_size == 8
    assert int_layer.spec.act_split == () and int_layer.act.group_size == 8
    assert int_layer.act.clip_ratio.numel() == 3
    assert (getattr(int_layer, "input_rotation", None) is not None) == (kind == "linear-rotated")
    x = _input(layer, seed=2)
    assert_reproduces(int_layer, export_context, layer, context, x, torch.tensor([900, 120]))
    if kind == "conv1x1":  # one position: a step size per group still, not one per sample
        assert_reproduces(int_layer, export_context, layer, context, x[:, :, :1], torch.tensor([900, 120]))


@pytest.mark.parametrize("kind", MODULES)
def test_version_four_files_split_per_group_still_compute_the_grouped_layer(kind):
    """Format version 4 stored a grouped layer as equal slices, each with a copy of the
    clip-ratio table; such a layer, built from its spec as a loader does, computes what
    the student layer computes."""
    torch.manual_seed(0)
    layer, context = _grouped_student(kind)
    spec = replace(layer_spec("layer", layer), act_group_size=0,
                   act_split=(8,) * (layer.weight_shape[1] // 8))
    export_context = TimestepContext()
    split = empty_int_layer(layer.base_layer, spec, export_context)
    assert isinstance(split, SplitIntLayer)
    split.set_weight(*weight_codes("layer", layer))
    for part in split.parts:
        part.act.load_state_dict({"clip_ratio": layer.act_quantizer.clip_ratio.detach(),
                                  "group_edges": layer.act_quantizer.group_edges})
    assert_reproduces(split, export_context, layer, context, _input(layer, seed=2), torch.tensor([900, 120]))


def test_a_split_rotated_linear_spec_round_trips():
    spec = LayerSpec("Linear", 4, False, 4, False, "per_token", 10, (16, 32), (8,) * 4, "hadamard")
    assert LayerSpec.from_json("x", spec.to_json(), Path("c.json")) == spec
    assert spec.part(8).input_rotation == "none" and spec.part(8).weight_shape == (16, 8)


def test_a_grouped_spec_round_trips_and_older_specs_have_no_groups():
    spec = LayerSpec("Linear", 4, False, 4, False, "per_token", 10, (16, 32), (), "hadamard", 8)
    assert LayerSpec.from_json("x", spec.to_json(), Path("c.json")) == spec
    older = {key: value for key, value in spec.to_json().items() if key != "act_group_size"}
    assert LayerSpec.from_json("x", older, Path("c.json")).act_group_size == 0


@pytest.mark.parametrize("change, message", [
    ({"act_group_size": 12}, r"act_group_size 12 must divide the input width"),
    ({"act_group_size": -1}, r"act_group_size must be a non-negative integer"),
    ({"act_granularity": "per_tensor_per_timestep"}, r"act_group_size > 0 needs act_granularity 'per_token'"),
    ({"act_split": [16, 16], "act_group_size": 32}, r"act_group_size 32 must divide the input width .*each act_split width"),
])
def test_bad_group_sizes_in_a_file_are_refused_by_name(change, message):
    spec = LayerSpec("Linear", 4, False, 4, False, "per_token", 10, (16, 32), (), "none", 8)
    with pytest.raises(ExportFormatError, match=r"c.json: layer 'x': " + message):
        LayerSpec.from_json("x", {**spec.to_json(), **change}, Path("c.json"))


def test_split_inputs_that_would_mix_grouped_and_ungrouped_slices_are_refused():
    layer = QuantConv2d.from_module(nn.Conv2d(24, 8, 1), 4, 4,
                                    QuantConfig(act_mode="dynamic_per_token", act_group_size=8))
    with pytest.raises(ValueError, match=r"slices \[16, 8\].* Pick a group size below the narrowest slice \(8\)"):
        layer.split_input((16, 8), QuantConfig(act_mode="dynamic_per_token", act_group_size=8))
    layer.split_input((16, 8), QuantConfig(act_mode="dynamic_per_token", act_group_size=4))
    assert [part.group_size for part in layer.act_quantizer.parts] == [4, 4]
