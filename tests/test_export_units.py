"""Export building blocks: dense packing, exact integer sums, integer layers vs student layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qdiff.config import LoRAConfig, QuantConfig
from qdiff.export.freeze import freeze_layer
from qdiff.export.int_layers import IntLayer
from qdiff.export.int_ops import exact_conv, int_linear
from qdiff.export.packing import pack_dense, packed_numel, unpack_dense
from qdiff.quant import QuantConv2d, QuantLinear, TimestepContext
from qdiff.quant.primitives import int_range


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_dense_packing_round_trips_in_bits_per_code(bits, symmetric):
    qmin, qmax = int_range(bits, symmetric)
    codes = torch.randint(qmin, qmax + 1, (5, 7, 3), generator=torch.Generator().manual_seed(bits))
    packed = pack_dense(codes, bits, qmin)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(105, bits) == 14 * bits
    assert torch.equal(unpack_dense(packed, bits, qmin, 105).view(5, 7, 3), codes.to(torch.int16))


def test_packing_refuses_codes_outside_the_grid():
    with pytest.raises(ValueError, match="cannot be packed in 3 bits"):
        pack_dense(torch.tensor([0, 8]), 3, 0)


def _random_operands(bits, symmetric, rows, inner, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = int_range(bits, symmetric)
    a = torch.randint(qmin, qmax + 1, (rows, inner), generator=gen)
    w = torch.randint(qmin, qmax + 1, (cols, inner), generator=gen)
    za = torch.randint(qmin, qmax + 1, (rows,), generator=gen)
    zw = torch.randint(qmin, qmax + 1, (cols,), generator=gen)
    return qmin, a, za, w, zw


@pytest.mark.parametrize("bits, symmetric", [(2, False), (3, True), (4, False), (8, False), (8, True)])
@pytest.mark.parametrize("rows, inner, cols", [(3, 5, 7), (40, 64, 24)])
def test_integer_linear_is_exact(bits, symmetric, rows, inner, cols):
    qmin, a, za, w, zw = _random_operands(bits, symmetric, rows, inner, cols, bits + rows)
    offset = qmin + 2 ** (bits - 1)
    got = int_linear(a.float(), za, offset, w.to(torch.int16), zw, offset)
    expected = (a - za[:, None]) @ (w - zw[:, None]).t()  # int64 reference
    assert got.dtype == torch.int64 and torch.equal(got, expected)


# 6 * 9 * 15 * 15 < 2**24: float32 suffices; 32 * 9 * 255 * 255 > 2**24: float64 needed
@pytest.mark.parametrize("channels, levels", [(6, 15), (32, 255)])
def test_exact_conv_sums_like_integers(channels, levels):
    gen = torch.Generator().manual_seed(0)
    x = torch.full((2, channels, 5, 5), levels)  # worst case first: the largest partial sums
    x[1] = torch.randint(-levels, levels + 1, (channels, 5, 5), generator=gen)
    w = torch.randint(-levels, levels + 1, (4, channels, 3, 3), generator=gen)
    w[0] = levels
    got = exact_conv(lambda a, b: F.conv2d(a, b, padding=1), x, w)
    cols = F.unfold(x.double(), 3, padding=1).round().long()  # exact small ints
    expected = (w.view(4, -1) @ cols).view(2, 4, 5, 5)
    assert torch.equal(got.long(), expected)


def _student_layer(module, weight_bits, act_bits, mode="temporal", symmetric=False):
    cfg = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, act_mode=mode,
                      weight_symmetric=symmetric, act_symmetric=symmetric, act_timestep_groups=3)
    context = TimestepContext()
    cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
    layer = cls.from_module(module, weight_bits, act_bits, cfg, LoRAConfig(rank=2), None, context)
    nn.init.normal_(layer.lora_B, std=0.05)  # LoRA that matters: the export must merge it
    layer.act_quantizer.start_calibration()
    for t, spread in ((900, 3.0), (100, 0.5)):
        with context.use(t):
            layer(torch.randn(4, *_shape(module)) * spread)
    layer.act_quantizer.finish_calibration()
    return layer, context


def _shape(module):
    return (6, module.in_features) if isinstance(module, nn.Linear) else (module.in_channels, 6, 6)


MODULES = {
    "linear": lambda: nn.Linear(24, 16),
    "conv": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv-1x1": lambda: nn.Conv2d(6, 8, 1),  # its moved int8 weight looks channels-last to conv2d
    "conv-strided-reflect": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect"),
    "conv-grouped-nobias": lambda: nn.Conv2d(6, 4, 3, groups=2, bias=False),
}


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("bits, mode, symmetric", [((4, 4), "temporal", False), ((8, 8), "temporal", True),
                                                   ((3, 3), "temporal", False),
                                                   ((4, 8), "dynamic_per_token", False)])
def test_integer_layer_reproduces_the_student_layer(kind, bits, mode, symmetric):
    torch.manual_seed(0)
    layer, context = _student_layer(MODULES[kind](), *bits, mode=mode, symmetric=symmetric)
    int_layer = freeze_layer("layer", layer, TimestepContext())
    x = torch.randn(3, *_shape(layer.base_layer)) * 2
    timesteps = torch.tensor([900, 120, 480])  # one per sample, one off the table
    with torch.no_grad(), context.use(timesteps), int_layer.act.context.use(timesteps):
        expected, got = layer(x), int_layer(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6 * float(expected.abs().max()))
    assert not layer.merged  # the student keeps its LoRA unmerged


def test_integer_layer_keeps_no_float_weight():
    layer, _ = _student_layer(nn.Linear(64, 32), 4, 4)
    int_layer = freeze_layer("layer", layer, TimestepContext())
    assert isinstance(int_layer, IntLayer)
    tensors = dict(int_layer.state_dict())
    assert tensors["weight_packed"].dtype == torch.uint8 and tensors["weight_packed"].numel() == 64 * 32 // 2
    floats = {name: t.numel() for name, t in tensors.items() if t.is_floating_point()}
    assert max(floats.values()) <= 32, floats  # per-channel scales, bias, activation tables only


@pytest.mark.parametrize("kind", MODULES)
def test_an_integer_layer_answers_the_shape_attributes_of_its_float_layer(kind):
    """Pipelines read them off their denoiser (SDXL: `unet.add_embedding.linear_1.in_features`)."""
    module = MODULES[kind]()
    layer, _ = _student_layer(module, 4, 4)
    int_layer = freeze_layer("layer", layer, TimestepContext())
    names = (("in_features", "out_features") if isinstance(module, nn.Linear)
             else ("in_channels", "out_channels", "kernel_size"))
    for name in names:
        assert getattr(int_layer, name) == getattr(module, name), name
