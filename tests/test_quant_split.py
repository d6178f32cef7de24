"""Split activation quantization of concatenated inputs: where UNets concatenate, the student's
per-slice quantizers, and the integer layer that sums one integer layer per slice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from qdiff.config import LoRAConfig, QuantConfig
from qdiff.export.format import ExportFormatError, LayerSpec
from qdiff.export.freeze import freeze_layer
from qdiff.export.int_layers import IntLayer
from qdiff.export.split_layer import SplitIntLayer
from qdiff.models.zoo.train_denoiser import CONTEXT_DIM, build_class_unet
from qdiff.quant import (QuantConv2d, QuantLinear, SplitActQuantizer, TemporalActQuantizer,
                         TimestepContext, calibrating, quantize_)
from qdiff.quant.concat_inputs import concat_input_splits

from tiny_families import tiny_dit, tiny_stable_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")


def _unet2d():
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=4).eval()


UNETS = {
    "class-ldm": (build_class_unet, lambda m: m(torch.randn(1, 3, 8, 8), 10,
                                                encoder_hidden_states=torch.randn(1, 1, CONTEXT_DIM))),
    "sd": (lambda: tiny_stable_diffusion().unet, lambda m: m(torch.randn(1, 4, 8, 8), 10,
                                                             encoder_hidden_states=torch.randn(1, 3, 16))),
    "unet2d": (_unet2d, lambda m: m(torch.randn(1, 3, 8, 8), 10)),
}


def _concatenations(model, call) -> dict[str, tuple[int, int]]:
    """(decoder, skip) channels of every up-block resnet input, read off a real forward."""
    seen = {}

    def record(index):
        def hook(block, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None).shape[1]
            skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            for r, resnet in enumerate(block.resnets):
                seen[f"up_blocks.{index}.resnets.{r}"] = (hidden, skips[-1 - r].shape[1])
                hidden = resnet.out_channels
        return hook

    handles = [block.register_forward_pre_hook(record(i), with_kwargs=True)
               for i, block in enumerate(model.up_blocks)]
    with torch.no_grad():
        call(model)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("unet", UNETS)
def test_split_points_are_the_concatenations_the_unet_makes(unet):
    build, call = UNETS[unet]
    torch.manual_seed(0)
    model = build().eval()
    seen = _concatenations(model, call)
    expected = {f"{name}.conv_shortcut": widths for name, widths in seen.items()
                if model.get_submodule(name).conv_shortcut is not None}
    assert expected and concat_input_splits(model) == expected
    if unet == "class-ldm":  # the embedded teacher's widths (64 decoder + 64 or 32 skip, then 32)
        assert len(expected) == 9 and expected["up_blocks.2.resnets.2.conv_shortcut"] == (32, 32)


def test_quantize_splits_the_concatenated_inputs_only_when_asked():
    model = build_class_unet()
    report = quantize_(model, QuantConfig(split_concat_inputs=True))
    quantizer = model.up_blocks[1].resnets[2].conv_shortcut.act_quantizer
    assert isinstance(quantizer, SplitActQuantizer) and quantizer.widths == (64, 32)
    assert all(isinstance(part, TemporalActQuantizer) for part in quantizer.parts)
    assert report.row("up_blocks.1.resnets.2.conv_shortcut").note == "input split 64+32"
    assert isinstance(model.up_blocks[1].resnets[2].conv1.act_quantizer, TemporalActQuantizer)
    plain = build_class_unet()
    quantize_(plain, QuantConfig())
    assert isinstance(plain.up_blocks[1].resnets[2].conv_shortcut.act_quantizer, TemporalActQuantizer)


def test_split_request_on_a_model_without_concatenations_is_refused():
    with pytest.raises(ValueError, match="no layer a concatenated input.*split_concat_inputs=false"):
        quantize_(tiny_dit().transformer, QuantConfig(split_concat_inputs=True))


def _split_layer(module, widths, weight_bits=4, act_bits=4, mode="temporal", symmetric=False):
    """A calibrated student layer whose input slices differ in range by 1000x."""
    cfg = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, act_mode=mode, act_timestep_groups=3,
                      weight_symmetric=symmetric, act_symmetric=symmetric)
    context = TimestepContext()
    cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
    layer = cls.from_module(module, weight_bits, act_bits, cfg, LoRAConfig(rank=2), None, context)
    if widths:
        layer.split_input(widths, cfg)
    nn.init.normal_(layer.lora_B, std=0.05)
    with torch.no_grad(), calibrating(layer):
        for t in (900, 100):
            with context.use(t):
                layer(_input(layer, 4))
    return layer, context


def _input(layer, batch, seed=0):
    """Channel slices of very different spread: 40 times the first, 0.04 times the rest."""
    gen = torch.Generator().manual_seed(seed)
    linear = isinstance(layer, QuantLinear)
    channels = layer.weight_shape[1]
    x = torch.randn((batch, 5, channels) if linear else (batch, channels, 5, 5), generator=gen)
    spread = torch.full((channels,), 0.04)
    spread[: channels // 2] = 40.0
    return x * (spread if linear else spread.view(-1, 1, 1))


def test_each_slice_gets_its_own_step_size_and_the_layer_its_accuracy():
    errors = {}
    for widths in ((), (8, 8)):
        torch.manual_seed(0)
        layer, context = _split_layer(nn.Conv2d(16, 8, 1), widths)
        x = _input(layer, 3, seed=1)
        with torch.no_grad(), context.use(900):
            quantized = layer.act_quantizer(x)
        errors[widths] = float((quantized - x)[:, 8:].abs().mean() / x[:, 8:].abs().mean())
        if widths:
            first, second = (part.scale.detach() for part in layer.act_quantizer.parts)
            assert (first / second).min() > 100  # the wide slice's step is far coarser
    assert errors[()] > 0.9  # one step size: the narrow slice rounds to nothing
    assert errors[(8, 8)] < 0.15


def test_every_slice_step_size_gets_a_gradient():
    layer, context = _split_layer(nn.Linear(12, 6), (4, 8))
    with context.use(100):
        layer(_input(layer, 2)).square().sum().backward()
    grads = [part.scale.grad for part in layer.act_quantizer.parts]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_slice_that_does_not_fit_the_layer_is_refused():
    cfg = QuantConfig()
    layer = QuantConv2d.from_module(nn.Conv2d(16, 8, 1), 4, 4, cfg)
    with pytest.raises(ValueError, match=r"slices \[8, 4\]: they add up to 12, not its 16 input channels"):
        layer.split_input((8, 4), cfg)
    grouped = QuantConv2d.from_module(nn.Conv2d(16, 8, 1, groups=2), 4, 4, cfg)
    with pytest.raises(ValueError, match="grouped Conv2d.*leave it unsplit"):
        grouped.split_input((8, 8), cfg)


MODULES = {
    "linear": (lambda: nn.Linear(24, 16), (16, 8)),
    "conv1x1": (lambda: nn.Conv2d(12, 8, 1), (6, 6)),
    "conv3x3-three-slices": (lambda: nn.Conv2d(12, 8, 3, padding=1, bias=False), (4, 6, 2)),
}
KERNELS = ("reference", "auto", "float")


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("bits, mode, symmetric", [((4, 4), "temporal", False), ((8, 8), "temporal", True),
                                                   ((4, 8), "dynamic_per_token", False)])
def test_split_integer_layer_reproduces_the_student_layer(kind, bits, mode, symmetric):
    build, widths = MODULES[kind]
    torch.manual_seed(0)
    layer, context = _split_layer(build(), widths, *bits, mode=mode, symmetric=symmetric)
    export_context = TimestepContext()
    int_layer = freeze_layer("layer", layer, export_context)
    assert isinstance(int_layer, SplitIntLayer) and int_layer.spec.act_split == widths
    assert [part.bias is not None for part in int_layer.parts] == [layer.base_layer.bias is not None] + [False] * (len(widths) - 1)
    assert_reproduces(int_layer, export_context, layer, context, _input(layer, 3, seed=2),
                      torch.tensor([900, 120, 480]))


def assert_reproduces(int_layer: nn.Module, export_context: TimestepContext, layer: nn.Module,
                      context: TimestepContext, x: torch.Tensor, timesteps: torch.Tensor) -> None:
    """The integer layer (every part, where split) gives the student layer's output on every kernel."""
    with torch.no_grad(), context.use(timesteps):
        expected = layer(x)
    for kernel in KERNELS:
        for part in (m for m in int_layer.modules() if isinstance(m, IntLayer)):
            part.set_kernel(kernel)
        with torch.no_grad(), export_context.use(timesteps):
            got = int_layer(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=4e-6 * float(expected.abs().max()),
                                   msg=kernel)


def test_split_spec_round_trips_and_version_one_specs_have_no_split():
    spec = LayerSpec("Conv2d", 4, False, 4, False, "per_tensor_per_timestep", 20, (8, 12, 1, 1), (8, 4))
    assert LayerSpec.from_json("x", spec.to_json(), Path("c.json")) == spec
    assert spec.part(4).weight_shape == (8, 4, 1, 1) and spec.part(4).act_split == ()
    old = {key: value for key, value in spec.to_json().items() if key != "act_split"}
    assert LayerSpec.from_json("x", old, Path("c.json")).act_split == ()
    with pytest.raises(ExportFormatError, match="c.json: layer 'x': act_split must be .* add up to weight_shape"):
        LayerSpec.from_json("x", {**spec.to_json(), "act_split": [8, 3]}, Path("c.json"))


def test_integer_layers_are_the_parts_so_kernels_switch_for_all_of_them():
    layer, _ = _split_layer(nn.Conv2d(12, 8, 1), (6, 6))
    int_layer = freeze_layer("layer", layer, TimestepContext())
    assert [type(m).__name__ for m in int_layer.modules() if isinstance(m, IntLayer)] == ["IntConv2d"] * 2
    keys = set(int_layer.state_dict())
    assert {"parts.0.bias", "parts.0.act.scale", "parts.1.act.scale", "parts.1.weight_packed"} <= keys
    assert "parts.1.bias" not in keys


def test_a_split_layer_with_a_slice_uncalibrated_or_tabled_apart_is_refused():
    layer, _ = _split_layer(nn.Conv2d(12, 8, 1), (6, 6))
    layer.act_quantizer.parts[1].set_timesteps([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"'up.shortcut': its input slices have activation tables of "
                                         r"different kinds, sizes or channel groups .*calibrate them together"):
        freeze_layer("up.shortcut", layer, TimestepContext())
    cfg = QuantConfig()
    fresh = QuantConv2d.from_module(nn.Conv2d(12, 8, 1), 4, 4, cfg)
    fresh.split_input((6, 6), cfg)
    first = fresh.act_quantizer.parts[0]
    first.start_calibration()
    with fresh.context.use(10):
        first(torch.randn(2, 6, 3, 3))
    first.finish_calibration()
    with pytest.raises(ValueError, match="'up.shortcut': its activation step sizes are not calibrated"):
        freeze_layer("up.shortcut", fresh, TimestepContext())
