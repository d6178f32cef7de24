"""lora.low_rank_backward: B and A get autograd's gradients without the full weight gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qdiff.config import ConfigError, LoRAConfig, QuantConfig, load_config
from qdiff.distill import loop
from qdiff.quant import QUANT_LAYERS, QuantLayer, lora_backward
from qdiff.quant.primitives import fake_quantize

from test_distill import _config, held_out_calls, kept_and_gradients

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = {
    "linear": (lambda: nn.Linear(24, 20), (2, 7, 24), False),
    "linear-rotated": (lambda: nn.Linear(24, 20), (2, 7, 24), True),
    "conv2d": (lambda: nn.Conv2d(5, 8, 3, stride=2, padding=1), (2, 5, 9, 9), False),
    "conv2d-dilated": (lambda: nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)),
                       (2, 4, 8, 7), False),
}
# Which way `lora_grads` takes: the rank-r products with the gathered correction, or the dense
# weight gradient zeroed at the clipped entries. Each is forced, so both are checked on every kind.
WAYS = {"low-rank": lambda *args: True, "dense": lambda *args: False}


def _layer(kind: str, low_rank_backward: bool, packed: bool, weight_init: str):
    """A W4A8 layer with trained-looking LoRA and frozen step sizes, and a float64 input."""
    build, shape, rotate = KINDS[kind]
    torch.manual_seed(0)
    module = build()
    cfg = QuantConfig(weight_bits=4, act_bits=8, weight_init=weight_init, packed_base_weight=packed)
    layer = QUANT_LAYERS[type(module)].from_module(
        module, 4, 8, cfg, LoRAConfig(rank=3, low_rank_backward=low_rank_backward),
        rotate_input=rotate)
    layer.context.set(500)
    x = torch.randn(shape)
    layer.act_quantizer.start_calibration()
    layer(x)
    layer.act_quantizer.finish_calibration()
    with torch.no_grad():  # B away from zero, big enough that B A moves weights across the grid
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(1)))
    layer.weight_quantizer.requires_grad_(False)
    return layer, x.requires_grad_(True)


def _gradients(layer, x):
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {"x": x.grad, "B": layer.lora_B.grad, "A": layer.lora_A.grad}
    grads.update({f"act.{n}": p.grad for n, p in layer.act_quantizer.named_parameters()})
    return y.detach(), grads


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("packed, weight_init", [(False, "minmax"), (False, "mse"), (True, "mse")])
@pytest.mark.parametrize("kind", KINDS)
def test_the_gradients_are_autograds(kind, packed, weight_init, way, monkeypatch):
    monkeypatch.setattr(lora_backward, "low_rank_is_cheaper", WAYS[way])
    monkeypatch.setattr(lora_backward, "GATHER_CHUNK", 7 * 50)  # gathers in several chunks
    results = []
    for low_rank in (False, True):
        layer, x = _layer(kind, low_rank, packed, weight_init)
        assert layer._uses_low_rank_backward() == low_rank
        results.append((layer, *_gradients(layer, x)))
    (plain, y_plain, expected), (ours, y_ours, got) = results
    assert torch.equal(y_ours, y_plain)  # the forward is the same computation
    clipped = ours.weight_quantizer.clipped(ours.adapted_weight())
    assert clipped.any() and not clipped.all()  # the correction has work to do
    assert expected.keys() == got.keys()
    for name, grad in expected.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("overwrite", [False, True])
def test_quantize_and_clipped_are_fake_quantizes_value_and_zero_gradient(overwrite):
    torch.manual_seed(0)
    weight = torch.randn(20, 24)  # the Linear's shape; about half of it below code 0
    weight[0, :4] = torch.tensor([0.0, 15.0, -1.0, 16.0]) * 0.1  # on and past both end codes
    layer, _ = _layer("linear", True, False, "minmax")
    quantizer = layer.weight_quantizer
    with torch.no_grad():
        quantizer.scale.fill_(0.1)
        quantizer.zero_point.fill_(0.0)
    weight.requires_grad_(True)
    scale, zero_point = quantizer.grid(weight)
    expected = fake_quantize(weight, scale, zero_point, quantizer.qmin, quantizer.qmax)
    expected.sum().backward()
    given = weight.detach().clone()
    quantized, codes, clipped = quantizer.quantize_and_clipped(given, overwrite=overwrite)
    assert (quantized.data_ptr() == given.data_ptr()) == overwrite  # computed in place, or not
    assert codes.dtype == torch.uint8 and torch.equal(codes, quantizer.codes(weight).to(torch.uint8))
    assert torch.equal(quantizer.dequantize(codes, quantized.dtype), quantized)  # the backward's W_q
    assert overwrite or torch.equal(given, weight.detach())
    assert clipped[0, :4].tolist() == [True, True, True, True]
    assert torch.equal(clipped, weight.grad == 0)
    assert torch.equal(quantized, expected.detach())


def test_overwrite_leaves_a_weight_of_another_dtype_alone():
    layer, _ = _layer("linear", True, False, "minmax")
    weight = torch.randn(20, 24).to(torch.bfloat16)
    given = weight.clone()
    quantized, _, _ = layer.weight_quantizer.quantize_and_clipped(given, overwrite=True)
    assert quantized.dtype == torch.float32 and torch.equal(given, weight)
    assert torch.equal(quantized, layer.weight_quantizer.quantize_and_clipped(weight.float())[0])


@pytest.mark.parametrize("out_features, in_features, rank, clipped, cheaper", [
    (1280, 11520, 32, 2 * 1280, True),  # SD's widest conv, min-max grid: two ends per row
    (1280, 11520, 32, 1280 * 11520 // 10, False),  # a tenth of the weights clipped
    (32, 32, 32, 0, False),  # LoRA at full rank: the products cost more than the weight gradient
])
def test_the_cheaper_way_follows_the_counts(out_features, in_features, rank, clipped, cheaper):
    assert lora_backward.low_rank_is_cheaper(out_features, in_features, rank, clipped) is cheaper


def test_autograds_path_serves_trained_step_sizes_and_unsupported_layers():
    layer, x = _layer("linear", True, False, "minmax")
    layer.weight_quantizer.requires_grad_(True)  # the step sizes need the full weight gradient
    assert not layer._uses_low_rank_backward()
    layer(x).sum().backward()
    assert layer.weight_quantizer.scale.grad.abs().sum() > 0
    with torch.no_grad():
        assert not layer._uses_low_rank_backward()
    lora = LoRAConfig(rank=2, low_rank_backward=True)
    for module in (nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(2, 2, 3, padding="same"),
                   nn.Conv2d(2, 2, 3, padding_mode="reflect"), nn.Conv3d(2, 2, 3)):
        wrapped = QUANT_LAYERS[type(module)].from_module(module, 4, 8, QuantConfig(), lora)
        assert not wrapped.low_rank_backward, module


def test_the_config_asks_for_frozen_weight_step_sizes(tmp_path):
    with pytest.raises(ConfigError, match="distill.weight_scale_lr=0"):
        load_config(None, [f"output_dir={tmp_path}", "lora.low_rank_backward=true"])
    cfg = load_config(None, [f"output_dir={tmp_path}", "lora.low_rank_backward=true",
                             "distill.weight_scale_lr=0"])
    assert cfg.lora.low_rank_backward


def test_a_student_step_has_autograds_gradients_and_keeps_less(random_class_ldm_pipeline, tmp_path,
                                                                 monkeypatch):
    """A whole student: the same gradients with and without, and no weight kept for backward."""
    monkeypatch.setattr(lora_backward, "low_rank_is_cheaper", WAYS["low-rank"])
    pipe = random_class_ldm_pipeline
    point = held_out_calls(pipe)[0]  # the teacher's first denoiser call of a walk
    kept, grads = [], []
    for low_rank in (False, True):
        cfg = _config(tmp_path, "distill.weight_scale_lr=0", f"lora.low_rank_backward={low_rank}")
        student = loop.build_student(pipe, cfg).model
        assert not any(p.requires_grad for n, p in student.named_parameters() if "weight_quantizer" in n)
        with torch.no_grad():  # LoRA as after some training
            for name, param in student.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        step_kept, step_grads = kept_and_gradients(pipe, student, point)
        kept.append(step_kept)
        grads.append(step_grads)
    # each layer keeps a byte per weight for its codes and one for its mask, not W0 + B A and W_q
    weights = sum(layer.base_layer.weight.numel() for layer in student.modules()
                  if isinstance(layer, QuantLayer) and layer.low_rank_backward)
    assert kept[0] - kept[1] >= 6 * weights, (kept, weights)
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name, grad in grads[0].items():  # float32 sums in another order: relative to the largest
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4,
                                   atol=1e-4 * float(grad.abs().max()), msg=name)
