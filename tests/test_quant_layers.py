"""Quantized layers: QALoRA y = Q_a(x) Q_w(W0 + B A), merge / to_module, packed base, aux Phi."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qdiff.config import AuxConfig, LoRAConfig, QuantConfig
from qdiff.quant import QUANT_LAYERS, QuantLinear
from qdiff.quant.primitives import fake_quantize


pytestmark = pytest.mark.usefixtures("one_thread")


KINDS = {
    "linear": (lambda: nn.Linear(12, 10), (2, 5, 12)),
    "linear-rotated": (lambda: nn.Linear(12, 10), (2, 5, 12)),  # input rotated by a Hadamard
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(3, 5, (2, 3, 3), padding=1, dilation=(1, 2, 1)), (2, 3, 3, 6, 5)),
}


def _layer(kind, weight_bits=4, act_bits=8, lora=True, aux_rank=None, seed=0, **quant):
    """A quantized layer of `kind` with calibrated activations, and its float original and input."""
    build, shape = KINDS[kind]
    torch.manual_seed(seed)
    module = build()
    x = torch.randn(shape)
    layer = QUANT_LAYERS[type(module)].from_module(
        copy.deepcopy(module), weight_bits, act_bits, QuantConfig(weight_bits=weight_bits, **quant),
        LoRAConfig(rank=3) if lora else None,
        AuxConfig(enabled=True, rank=aux_rank) if aux_rank else None,
        rotate_input=kind.endswith("-rotated"))
    layer.context.set(500)
    layer.act_quantizer.start_calibration()
    layer(x)
    layer.act_quantizer.finish_calibration()
    return layer, module, x


def _rotated(layer, t):
    """An input (or a Linear weight) in the basis the layer quantizes in: t @ H if it rotates."""
    return t if layer.input_rotation is None else layer.input_rotation(t)


def _train_lora(layer, seed=1):
    """What training does to LoRA: B moves away from zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_b_equals_quantized_base(kind):
    layer, module, x = _layer(kind)
    assert layer.lora_B.abs().sum() == 0 and layer.lora_A.abs().sum() > 0
    x_q = layer.act_quantizer(_rotated(layer, x))
    w_q = layer.weight_quantizer(_rotated(layer, module.weight))
    expected = layer._apply_weight(x_q, w_q, module.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    plain, _, _ = _layer(kind, lora=False)
    torch.testing.assert_close(layer(x), plain(x), rtol=0, atol=0)
    _train_lora(layer)
    assert not torch.allclose(layer(x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_delta_weight_is_b_times_a_in_kernel_shape(kind):
    layer, module, _ = _layer(kind)
    _train_lora(layer)
    delta = layer.get_delta_weight()
    assert delta.shape == module.weight.shape
    torch.testing.assert_close(delta.flatten(1), layer.lora_B @ layer.lora_A.flatten(1))
    assert torch.linalg.matrix_rank(delta.flatten(1)) <= 3


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_merge_leaves_output_unchanged(kind, packed):
    layer, _, x = _layer(kind, packed_base_weight=packed)
    _train_lora(layer)
    before = layer(x)
    base_before = layer.base_weight().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)
    assert not torch.allclose(layer.base_weight(), base_before)
    if packed:
        with pytest.raises(NotImplementedError):
            layer.unmerge()
    else:
        layer.unmerge()
        torch.testing.assert_close(layer.base_weight(), base_before)
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_to_module_reproduces_the_layer(kind, packed):
    layer, module, x = _layer(kind, packed_base_weight=packed)
    _train_lora(layer)
    plain = layer.to_module()
    assert type(plain) is type(module)
    assert set(dict(plain.named_parameters())) == {"weight", "bias"}
    x_q = layer.act_quantizer(_rotated(layer, x))
    if layer.input_rotation is not None:  # plain takes inputs in their own basis: rotate back
        x_q = x_q @ layer.input_rotation.matrix().T
    torch.testing.assert_close(plain(x_q), layer(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("kind", KINDS)
def test_packed_base_weight_same_output_fewer_bytes(kind, bits):
    float_layer, module, x = _layer(kind, weight_bits=bits)
    packed_layer, _, _ = _layer(kind, weight_bits=bits, packed_base_weight=True)
    packed_layer.act_quantizer.load_state_dict(float_layer.act_quantizer.state_dict())
    torch.testing.assert_close(packed_layer(x), float_layer(x), rtol=0, atol=1e-6)
    assert packed_layer.base_layer.weight is None
    assert "base_layer.weight" not in packed_layer.state_dict()
    stored = sum(packed_layer.get_buffer(name).nbytes
                 for name in ("base_codes", "base_scale", "base_zero_point"))
    float_bytes = module.weight.nbytes
    assert stored < float_bytes / (2 if bits == 8 else 3)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_lora_and_step_sizes_not_the_base(kind):
    layer, _, x = _layer(kind)
    layer(x).pow(2).sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0
    assert layer.weight_quantizer.scale.grad.abs().sum() > 0
    assert layer.act_quantizer.scale.grad.abs().sum() > 0
    assert not layer.base_layer.weight.requires_grad and layer.base_layer.weight.grad is None
    assert not layer.base_layer.bias.requires_grad


def test_lora_rank_is_capped_and_wrong_module_type_is_rejected():
    layer = QuantLinear.from_module(nn.Linear(2, 6), 4, 4, QuantConfig(), LoRAConfig(rank=32))
    assert layer.lora_A.shape == (2, 2) and layer.lora_B.shape == (6, 2)
    with pytest.raises(TypeError, match="Linear"):
        QuantLinear.from_module(nn.Conv2d(2, 2, 1), 4, 4, QuantConfig())


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_aux_init_is_top_r_svd_of_the_weight_error_and_lowers_output_error(kind):
    rank = 4
    layer, module, x = _layer(kind, weight_bits=3, lora=False, aux_rank=rank)
    w = module.weight.detach()
    error = (w - layer.weight_quantizer(w)).flatten(1)
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    top_r = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    torch.testing.assert_close(layer.aux.L @ layer.aux.R, top_r, rtol=1e-4, atol=1e-5)
    reference = module(x)
    with_phi = (layer(x) - reference).norm()
    aux, layer.aux = layer.aux, None
    without_phi = (layer(x) - reference).norm()
    assert with_phi < 0.9 * without_phi
    layer.aux = aux
    with pytest.raises(ValueError, match="Phi"):
        layer.to_module()


def test_aux_branch_acts_on_the_quantized_input():
    layer, _, x = _layer("linear", weight_bits=4, act_bits=2, lora=False, aux_rank=2)
    x_q = layer.act_quantizer(x)
    phi = layer.aux.L @ layer.aux.R
    expected = nn.functional.linear(x_q, layer.quantized_weight(), layer.base_layer.bias) + x_q @ phi.T
    torch.testing.assert_close(layer(x), expected)
    assert not torch.allclose(x_q, x)


def test_fake_quantized_weight_lies_on_the_per_channel_grid():
    layer, module, _ = _layer("conv2d", weight_bits=4)
    w_q = layer.quantized_weight()
    scale = layer.weight_quantizer.scale.view(-1, 1, 1, 1)
    zp = layer.weight_quantizer.zero_point.view(-1, 1, 1, 1)
    torch.testing.assert_close(w_q, fake_quantize(module.weight, scale, zp, 0, 15))
    for channel in range(w_q.shape[0]):
        assert w_q[channel].unique().numel() <= 16
