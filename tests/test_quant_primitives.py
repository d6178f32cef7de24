"""Fake-quantization primitives: exact grid arithmetic, LSQ gradients, init searches, packing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qdiff.quant import LSQWeightQuantizer, pack_codes, primitives, unpack_codes
from qdiff.quant.primitives import (fake_quantize, grad_scale, int_range, lp_search_init,
                                    minmax_init, round_ste)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bits, symmetric, expected", [
    (2, True, (-2, 1)), (2, False, (0, 3)), (4, True, (-8, 7)), (4, False, (0, 15)),
    (8, True, (-128, 127)), (8, False, (0, 255)),
])
def test_int_range(bits, symmetric, expected):
    assert int_range(bits, symmetric) == expected


@pytest.mark.parametrize("bits", [1, 9])
def test_int_range_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        int_range(bits, True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_equals_reference_formula(bits, symmetric):
    qmin, qmax = int_range(bits, symmetric)
    x = torch.randn(64, generator=torch.Generator().manual_seed(bits)) * 3
    scale = torch.tensor(0.37)
    zp = torch.tensor(0.0 if symmetric else float(qmax // 3))
    expected = (np.clip(np.round(x.numpy() / np.float32(0.37)) + zp.item(), qmin, qmax) - zp.item()) \
        * np.float32(0.37)
    out = fake_quantize(x, scale, zp, qmin, qmax)
    np.testing.assert_array_equal(out.numpy(), expected.astype(np.float32))
    codes = out / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-4)  # on the integer grid
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    assert (out != x).any()


def test_round_ste_and_grad_scale_values_and_gradients():
    x = torch.tensor([0.4, 1.6, -2.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, -2.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    s = torch.tensor(2.0, requires_grad=True)
    z = grad_scale(s, 0.25)
    assert z.item() == 2.0
    (3 * z).backward()
    assert s.grad.item() == pytest.approx(0.75)


def _analytic_lsq_grads(x, s, zp, qmin, qmax, upstream):
    """LSQ/LSQ+ gradients written out per element (times upstream).

    Inside means qmin < x/s + zp < qmax on the *unrounded* value (LSQ's definition).
    """
    v = x / s + zp
    below, above = v < qmin, v > qmax
    inside = ~(below | above)
    ds = torch.where(inside, torch.round(x / s) - x / s,
                     torch.where(below, torch.full_like(x, qmin) - zp, torch.full_like(x, qmax) - zp))
    dzp = torch.where(inside, torch.zeros_like(x), -s.expand_as(x))
    dx = inside.float()
    return (upstream * ds), (upstream * dzp), upstream * dx


@pytest.mark.parametrize("bits, symmetric", [(2, True), (4, False), (8, False)])
def test_fake_quantize_gradients_are_lsq(bits, symmetric):
    qmin, qmax = int_range(bits, symmetric)
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(200, generator=gen) * 2).requires_grad_(True)
    s = torch.tensor(0.3, requires_grad=True)
    zp = torch.tensor(0.0 if symmetric else 2.0, requires_grad=True)
    upstream = torch.randn(200, generator=gen)
    fake_quantize(x, s, zp, qmin, qmax).backward(upstream)
    ds, dzp, dx = _analytic_lsq_grads(x.detach(), s.detach(), zp.detach(), qmin, qmax, upstream)
    assert torch.allclose(s.grad, ds.sum(), atol=1e-4)
    assert torch.allclose(zp.grad, dzp.sum(), atol=1e-4)
    torch.testing.assert_close(x.grad, dx)
    inside = dx != 0
    assert inside.any() and not inside.all()  # both clipped and in-range elements occur


@pytest.mark.parametrize("learn_zero_point", [False, True])
def test_weight_quantizer_per_channel_lsq_gradient_with_grad_scale(learn_zero_point):
    quantizer = LSQWeightQuantizer(3, bits=3, symmetric=False, learn_zero_point=learn_zero_point)
    weight = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        quantizer.scale.copy_(torch.tensor([0.1, 0.2, 0.4]))
        quantizer.zero_point.copy_(torch.tensor([3.0, 4.0, 2.0]))
    upstream = torch.randn_like(weight)
    quantizer(weight).backward(upstream)
    g = 1.0 / np.sqrt(weight[0].numel() * quantizer.qmax)
    s = quantizer.scale.detach().view(-1, 1, 1, 1)
    zp = quantizer.zero_point.detach().view(-1, 1, 1, 1)
    ds, dzp, _ = _analytic_lsq_grads(weight, s, zp, quantizer.qmin, quantizer.qmax, upstream)
    assert torch.allclose(quantizer.scale.grad, ds.sum(dim=(1, 2, 3)) * g, atol=1e-5)
    if learn_zero_point:
        assert torch.allclose(quantizer.zero_point.grad, dzp.sum(dim=(1, 2, 3)) * g, atol=1e-5)
    else:
        assert not isinstance(quantizer.zero_point, torch.nn.Parameter)


def test_weight_codes_are_the_codes_fake_quantize_trained_on_also_at_halves():
    """The export packs `codes()`: at a weight halfway between two steps with an odd zero
    point, rounding before adding it (round(2.5) + 3 = 5) is not fake_quantize's round(5.5) = 6."""
    quantizer = LSQWeightQuantizer(2, bits=4, symmetric=False)
    with torch.no_grad():
        quantizer.scale.copy_(torch.tensor([0.5, 0.25]))
        quantizer.zero_point.copy_(torch.tensor([3.0, 8.0]))
    steps = torch.arange(-8.0, 8.0).add(0.5)  # x / s: every half, inside and beyond the grid
    weight = torch.stack([steps * 0.5, steps * 0.25])
    scale, zero_point = quantizer.scale.view(-1, 1), quantizer.zero_point.view(-1, 1)
    dequantized = (quantizer.codes(weight).float() - zero_point) * scale
    assert torch.equal(dequantized, quantizer(weight))
    assert torch.equal(quantizer.codes(weight)[0, 10:12], torch.tensor([6, 6], dtype=torch.int16))


def test_minmax_init_per_channel_and_per_tensor():
    x = torch.tensor([[-1.0, 0.0, 3.0], [0.5, 1.0, 2.0]])
    scale, zp = minmax_init(x, 0, 15, symmetric=False, channel_dim=0)
    assert torch.allclose(scale, torch.tensor([4.0 / 15, 2.0 / 15]))  # range always covers 0
    assert zp.tolist() == [4.0, 0.0]
    scale, zp = minmax_init(x, -8, 7, symmetric=True)
    assert scale.item() == pytest.approx(3.0 / 7) and zp.item() == 0.0


def _lp_error(x, scale, zp, qmin, qmax, p):
    return (x - fake_quantize(x, scale, zp, qmin, qmax)).abs().pow(p).mean(dim=-1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_lp_search_beats_minmax_and_is_per_channel(symmetric):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 512, generator=gen)  # channel 1: Gaussian tails, worth clipping
    x[0] = torch.rand(512, generator=gen) * 4 - 2  # channel 0: uniform, min-max is near optimal
    qmin, qmax = int_range(4, symmetric)
    mm_scale, mm_zp = minmax_init(x, qmin, qmax, symmetric, channel_dim=0)
    scale, zp = lp_search_init(x, qmin, qmax, symmetric, p=2.4, channel_dim=0)
    mm_err = _lp_error(x, mm_scale[:, None], mm_zp[:, None], qmin, qmax, 2.4)
    err = _lp_error(x, scale[:, None], zp[:, None], qmin, qmax, 2.4)
    assert (err <= mm_err + 1e-7).all()
    assert err[1] < 0.85 * mm_err[1]
    ratio = scale / mm_scale
    assert ratio[0] - ratio[1] > 0.05  # each channel keeps its own clipping ratio
    per_tensor, _ = lp_search_init(x, qmin, qmax, symmetric, p=2.4)
    assert per_tensor.dim() == 0


@pytest.mark.parametrize("channel_dim, shape", [(0, (6, 40)), (1, (5, 7, 3)), (None, (300,))])
@pytest.mark.parametrize("batch_elements", [1, 1 << 20])  # one ratio per batch; all 100 at once
def test_lp_search_matches_a_search_of_one_ratio_at_a_time(monkeypatch, channel_dim, shape,
                                                            batch_elements):
    """Against a search of one ratio at a time: the same grid to the bit, however the ratios
    are batched, and a finite one for an all-zero channel (where every ratio ties)."""
    monkeypatch.setattr(primitives, "SEARCH_ELEMENTS", batch_elements)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 3
    if channel_dim is not None:
        x.select(channel_dim, 2).zero_()
    dims = tuple(d for d in range(x.dim()) if d != channel_dim)
    qmin, qmax = int_range(4, False)
    low, high = x.amin(dim=dims), x.amax(dim=dims)
    view = [-1 if d == channel_dim else 1 for d in range(x.dim())]
    errors = []
    for ratio in primitives.DEFAULT_RATIOS:
        scale, zp = primitives.scale_from_range(low * ratio, high * ratio, qmin, qmax, False)
        q = fake_quantize(x, scale.reshape(view), zp.reshape(view), qmin, qmax)
        errors.append((x - q).abs().pow(2.4).mean(dim=dims))
    best = torch.stack(errors).argmin(dim=0)  # the first minimum (documented for argmin)
    ratio = primitives.DEFAULT_RATIOS[best]
    expected = primitives.scale_from_range(low * ratio, high * ratio, qmin, qmax, False)
    found = lp_search_init(x, qmin, qmax, False, p=2.4, channel_dim=channel_dim)
    torch.testing.assert_close(found, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_pack_unpack_roundtrip_and_size(bits, symmetric):
    qmin, qmax = int_range(bits, symmetric)
    codes = torch.randint(qmin, qmax + 1, (7, 5, 3), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, bits, qmin)
    assert packed.dtype == torch.uint8
    per_byte = 4 if bits == 2 else 2 if bits <= 4 else 1
    assert packed.numel() == -(-codes.numel() // per_byte)
    assert torch.equal(unpack_codes(packed, bits, qmin, codes.shape).long(), codes)


def test_fake_quantize_keeps_only_its_input_for_the_backward_pass():
    """A weight-sized tensor kept per fake-quantized tensor, not three: the training memory
    of a large student is mostly these (two extra weight copies per layer before)."""
    x = torch.randn(64, 32, requires_grad=True)
    scale = torch.full((64, 1), 0.1, requires_grad=True)
    zero_point = torch.full((64, 1), 7.0, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = fake_quantize(x * 1.0, scale, zero_point, 0, 15)
    assert sum(saved) <= x.numel() + 2 * scale.numel()
    out.sum().backward()
    assert x.grad is not None and scale.grad.shape == scale.shape and zero_point.grad.shape == (64, 1)


def _autograd_chain(x, scale, zero_point, qmin, qmax):
    """The formula with autograd through every op (what fake_quantize's Function replaces)."""
    zp = round_ste(zero_point)
    return (round_ste(torch.clamp(x / scale + zp, qmin, qmax)) - zp) * scale


def _fake_quantize_leaves(scale_shape: tuple, on_grid: bool, gen: torch.Generator) -> list:
    """x, scale, zero point; `on_grid`: x exactly on the grid, end codes included (a packed W0)."""
    scale = 2.0 ** -torch.randint(2, 6, scale_shape, generator=gen).float()
    zero_point = torch.randint(0, 15, scale_shape, generator=gen).float()
    if on_grid:
        codes = torch.randint(0, 16, (16, 24), generator=gen).float()
        codes[0, :2] = torch.tensor([0.0, 15.0])
        return [(codes - zero_point) * scale, scale, zero_point]
    return [torch.randn(16, 24, generator=gen) * 2, scale * 1.3, zero_point]


@pytest.mark.parametrize("on_grid", [False, True])
@pytest.mark.parametrize("scale_shape", [(), (16, 1)])
def test_fake_quantize_gradients_are_autograds_bit_for_bit(scale_shape, on_grid):
    """Also at the grid's end codes, which LSQ (and torch.clamp's backward) count as clipped."""
    gen = torch.Generator().manual_seed(3)
    leaves = _fake_quantize_leaves(scale_shape, on_grid, gen)
    upstream = torch.randn(16, 24, generator=gen)
    grads = []
    for function in (fake_quantize, _autograd_chain):
        inputs = [leaf.clone().requires_grad_(True) for leaf in leaves]
        out = function(inputs[0] * 1.0, inputs[1], inputs[2], 0, 15)
        out.backward(upstream)
        grads.append([out.detach()] + [leaf.grad for leaf in inputs])
    for ours, reference in zip(*grads):
        assert torch.equal(ours, reference)
