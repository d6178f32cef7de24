"""Activation quantizers: temporal LSQ tables indexed by timestep value, dynamic per-token."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qdiff.quant import DynamicActQuantizer, TemporalActQuantizer, TimestepContext, primitives
from qdiff.quant.primitives import DEFAULT_RATIOS, fake_quantize


pytestmark = pytest.mark.usefixtures("one_thread")


def _calibrated(timesteps=(100.0, 900.0), spreads=(1.0, 10.0), symmetric=False):
    """Temporal quantizer calibrated on data whose spread depends on the timestep."""
    context = TimestepContext()
    quantizer = TemporalActQuantizer(4, context, symmetric=symmetric)
    gen = torch.Generator().manual_seed(0)
    quantizer.start_calibration()
    for t, spread in zip(timesteps, spreads):
        with context.use(t):
            x = torch.randn(4, 8, 16, generator=gen) * spread
            assert torch.equal(quantizer(x), x)  # calibration passes inputs through
    quantizer.finish_calibration()
    return quantizer, context


def test_two_timesteps_select_two_step_sizes():
    quantizer, context = _calibrated()
    assert quantizer.timesteps.tolist() == [100.0, 900.0]
    small, large = quantizer.scale.tolist()
    assert 5 < large / small < 20  # each entry follows its own timestep's range
    x = torch.randn(2, 3, 16) * 5
    for index, t in enumerate((100, 900)):
        with context.use(t):
            expected = fake_quantize(x, quantizer.scale[index], quantizer.zero_point[index],
                                     quantizer.qmin, quantizer.qmax)
            torch.testing.assert_close(quantizer(x), expected, rtol=0, atol=0)
    with context.use(100):
        low = quantizer(x)
    with context.use(900):
        assert not torch.equal(low, quantizer(x))


@pytest.mark.parametrize("t, entry", [(0, 0), (120, 0), (499, 0), (501, 1), (650, 1), (5000, 1)])
def test_unseen_timestep_uses_nearest_entry(t, entry):
    quantizer, context = _calibrated()
    x = torch.randn(2, 5, 16) * 3
    with context.use(t):
        out = quantizer(x)
    with context.use(quantizer.timesteps[entry]):
        torch.testing.assert_close(out, quantizer(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 7, 16), (3, 4, 5, 5)])
def test_per_sample_timesteps_match_separate_calls(shape):
    quantizer, context = _calibrated()
    x = torch.randn(shape) * 4
    timesteps = torch.tensor([100, 900, 350])
    with context.use(timesteps):
        batched = quantizer(x)
    for i, t in enumerate(timesteps):
        with context.use(t):
            torch.testing.assert_close(batched[i:i + 1], quantizer(x[i:i + 1]), rtol=0, atol=0)


def test_folded_batch_repeats_each_samples_timestep():
    quantizer, context = _calibrated()
    x = torch.randn(4, 6, 16) * 4  # (B * frames, ...) with B = 2, frames = 2
    with context.use(torch.tensor([100, 900])):
        folded = quantizer(x)
    with context.use(torch.tensor([100, 100, 900, 900])):
        torch.testing.assert_close(folded, quantizer(x), rtol=0, atol=0)


def test_per_timestep_step_size_gradients_go_to_their_own_entry():
    quantizer, context = _calibrated()
    x = torch.randn(2, 5, 16) * 4
    with context.use(torch.tensor([100, 100])):
        quantizer(x).pow(2).sum().backward()
    assert quantizer.scale.grad[0] != 0 and quantizer.scale.grad[1] == 0


def test_declared_table_from_scheduler_timesteps_fills_unobserved_entries():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    context = TimestepContext()
    quantizer = TemporalActQuantizer(8, context)
    quantizer.set_timesteps(scheduler.timesteps)
    quantizer.start_calibration()
    assert scheduler.timesteps.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    for t, spread in ((900, 10.0), (0, 1.0)):  # calibrate two timesteps only
        with context.use(t):
            quantizer(torch.randn(2, 4, 8) * spread)
    quantizer.finish_calibration()
    assert quantizer.timesteps.tolist() == sorted(scheduler.timesteps.float().tolist())
    scales = dict(zip(quantizer.timesteps.tolist(), quantizer.scale.tolist()))
    assert scales[0.0] == scales[400.0] and scales[500.0] == scales[900.0]
    assert scales[900.0] > 5 * scales[0.0]


def test_state_dict_loads_into_a_fresh_uncalibrated_quantizer():
    quantizer, _ = _calibrated()
    fresh = TemporalActQuantizer(4, TimestepContext())
    fresh.load_state_dict(quantizer.state_dict())
    assert torch.equal(fresh.scale, quantizer.scale)
    assert torch.equal(fresh.timesteps, quantizer.timesteps)


def test_missing_timestep_and_missing_calibration_are_clear_errors():
    quantizer, _ = _calibrated()
    with pytest.raises(RuntimeError, match="timestep"):
        quantizer(torch.randn(1, 4))
    fresh = TemporalActQuantizer(4, TimestepContext())
    with fresh.context.use(10), pytest.raises(RuntimeError, match="calibrated"):
        fresh(torch.randn(1, 4))


class _Denoiser(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quantizer = None

    def forward(self, sample, timestep=None, other=None):
        return sample


class _TimestepThird(nn.Module):
    def forward(self, hidden_states, encoder_hidden_states, timestep):
        return hidden_states


@pytest.mark.parametrize("module, call, expected", [
    (_Denoiser(), lambda m: m(torch.zeros(2), torch.tensor([5, 7])), [5.0, 7.0]),
    (_Denoiser(), lambda m: m(torch.zeros(2), timestep=3), [3.0]),
    (_TimestepThird(), lambda m: m(torch.zeros(2), torch.zeros(2), torch.tensor(11)), [11.0]),
    (_TimestepThird(),  # per-token timesteps: the sample's noisy tokens set its timestep
     lambda m: m(torch.zeros(2), torch.zeros(2), timestep=torch.tensor([[0, 4]])), [4.0]),
])
def test_pre_hook_reads_the_timestep_argument(module, call, expected):
    context = TimestepContext()
    context.install(module)
    call(module)
    assert context.timesteps.tolist() == expected


def test_deepcopy_rewires_hook_to_the_copys_context():
    root = _Denoiser()
    context = TimestepContext()
    root.quantizer = TemporalActQuantizer(4, context)
    context.install(root)
    clone = copy.deepcopy(root)
    clone(torch.zeros(1), 42)
    assert clone.quantizer.context.timesteps.tolist() == [42.0]
    assert context.timesteps is None


def _dynamic(symmetric=False, channel_dim=-1, groups=4):
    context = TimestepContext()
    return DynamicActQuantizer(4, context, symmetric=symmetric, num_groups=groups,
                               channel_dim=channel_dim), context


@pytest.mark.parametrize("symmetric", [True, False])
def test_dynamic_quantizes_each_token_on_its_own_grid(symmetric):
    quantizer, context = _dynamic(symmetric)
    with torch.no_grad():
        quantizer.clip_ratio.fill_(0.8)
    x = torch.randn(2, 3, 32)
    x[0, 1] *= 100  # a loud token must not coarsen the others
    with context.use(500):
        out = quantizer(x)
    for b in range(2):
        for tok in range(3):
            row = x[b, tok]
            if symmetric:
                scale, zp = 0.8 * row.abs().max() / 7, torch.tensor(0.0)
            else:
                high, low = row.max().clamp_min(0), row.min().clamp_max(0)
                scale = 0.8 * (high - low) / 15
                zp = torch.round(-low * 15 / (high - low))
            expected = fake_quantize(row, scale, zp, quantizer.qmin, quantizer.qmax)
            torch.testing.assert_close(out[b, tok], expected)
    assert (out[1] - x[1]).abs().max() < 0.3 * x[1].abs().max()  # per-tensor would zero it


def test_dynamic_clip_ratio_is_chosen_by_timestep_group_and_per_sample():
    quantizer, context = _dynamic(groups=4)  # buckets [0,250) [250,500) [500,750) [750,..)
    with torch.no_grad():
        quantizer.clip_ratio.copy_(torch.tensor([1.0, 0.5, 0.7, 0.9]))
    x = torch.randn(3, 5, 16)
    outputs = {}
    for t in (10, 240, 260, 999):
        with context.use(t):
            outputs[t] = quantizer(x)
    assert torch.equal(outputs[10], outputs[240])
    assert not torch.equal(outputs[240], outputs[260])
    with context.use(torch.tensor([10, 260, 999])):
        batched = quantizer(x)
    for i, t in enumerate((10, 260, 999)):
        torch.testing.assert_close(batched[i], outputs[t][i], rtol=0, atol=0)
    with context.use(260):
        quantizer(x).sum().backward()
    assert quantizer.clip_ratio.grad[1] != 0 and quantizer.clip_ratio.grad[[0, 2, 3]].eq(0).all()


def test_dynamic_calibration_clips_wide_tokens_and_lowers_error():
    quantizer, context = _dynamic(groups=2)
    x = torch.randn(4, 16, 256, generator=torch.Generator().manual_seed(0))  # wide Gaussian tokens
    quantizer.start_calibration()
    with context.use(900):
        quantizer(x)
    quantizer.finish_calibration()
    ratio = quantizer.clip_ratio.tolist()
    assert ratio[0] == ratio[1] < 1.0  # unobserved group copies the nearest observed one
    with context.use(900):
        calibrated = (quantizer(x) - x).abs().pow(2.4).mean()
        with torch.no_grad():
            quantizer.clip_ratio.fill_(1.0)
        minmax = (quantizer(x) - x).abs().pow(2.4).mean()
    assert calibrated < minmax


def test_dynamic_minmax_init_keeps_each_tokens_own_range():
    """`act_init: minmax`: calibration leaves every clip ratio at 1 (torchao's dynamic int8
    grid), where the Lp search of the same tokens clips them."""
    x = torch.randn(4, 16, 256, generator=torch.Generator().manual_seed(0))
    ratios = {}
    for init in ("mse", "minmax"):
        context = TimestepContext()
        quantizer = DynamicActQuantizer(4, context, num_groups=2, init_method=init)
        quantizer.start_calibration()
        with context.use(900):
            quantizer(x)
        quantizer.finish_calibration()
        ratios[init] = quantizer.clip_ratio.tolist()
    assert ratios["minmax"] == [1.0, 1.0] and ratios["mse"][0] < 1.0
    with pytest.raises(ValueError, match="'mse' or 'minmax'"):
        DynamicActQuantizer(4, TimestepContext(), init_method="percentile")


@pytest.mark.parametrize("batch_elements", [1, 1 << 20])  # one ratio per batch; all 100 at once
def test_dynamic_calibration_picks_the_ratio_with_the_lowest_error(monkeypatch, batch_elements):
    monkeypatch.setattr(primitives, "SEARCH_ELEMENTS", batch_elements)
    quantizer, _ = _dynamic(groups=1)
    x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(1))  # 32 tokens: all kept
    quantizer.start_calibration()
    quantizer(x)
    quantizer.finish_calibration()
    chosen, errors = quantizer.clip_ratio.item(), {}
    with torch.no_grad():
        for ratio in DEFAULT_RATIOS.tolist():
            quantizer.clip_ratio.fill_(ratio)
            errors[ratio] = (quantizer(x) - x).abs().pow(2.4).mean().item()
    assert errors[chosen] <= min(errors.values()) * (1 + 1e-6)
    assert errors[chosen] < 0.95 * errors[1.0]  # wide Gaussian tokens: clipping pays


def test_dynamic_conv_tokens_span_the_channel_dim():
    quantizer, context = _dynamic(channel_dim=1)
    x = torch.randn(2, 8, 3, 3)
    with context.use(0):
        out = quantizer(x)
    linear, linear_context = _dynamic(channel_dim=-1)
    with linear_context.use(0):
        expected = linear(x.movedim(1, -1)).movedim(-1, 1)
    torch.testing.assert_close(out, expected)


def _calibrated_with(init_method: str, per_timestep: bool):
    context = TimestepContext()
    quantizer = TemporalActQuantizer(4, context, init_method=init_method, per_timestep=per_timestep)
    data = {100.0: torch.linspace(-1.0, 2.0, 64), 900.0: torch.linspace(-6.0, 9.0, 64)}
    quantizer.start_calibration()
    for t, x in data.items():
        with context.use(t):
            quantizer(x.view(1, -1))
    quantizer.finish_calibration()
    return quantizer


def test_minmax_init_covers_each_timesteps_observed_range():
    quantizer = _calibrated_with("minmax", per_timestep=True)
    torch.testing.assert_close(quantizer.scale.detach(), torch.tensor([3.0 / 15, 15.0 / 15]))
    torch.testing.assert_close(quantizer.zero_point, torch.tensor([5.0, 6.0]))  # round(-low / s)


@pytest.mark.parametrize("init_method", ["minmax", "mse"])
def test_pooled_init_gives_every_timestep_the_same_range(init_method):
    quantizer = _calibrated_with(init_method, per_timestep=False)
    assert quantizer.scale[0] == quantizer.scale[1]
    assert quantizer.zero_point[0] == quantizer.zero_point[1]
    if init_method == "minmax":  # the union of both ranges: [-6, 9]
        torch.testing.assert_close(quantizer.scale.detach()[0], torch.tensor(1.0))
