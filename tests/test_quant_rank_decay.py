"""QVGen rank decay: ranks halve on schedule, the weak half fades, Phi is gone at the end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qdiff.config import AuxConfig, QuantConfig
from qdiff.quant import RankDecay, quant_parameters, quantize_


pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)
        self.b = nn.Conv2d(16, 8, 1)
        self.c = nn.Linear(16, 3)  # min(out, in) = 3 < 8: a smaller branch

    def forward(self, x, timestep):
        h = self.a(x)
        h = self.b(h[..., None, None])[..., 0, 0]
        return self.c(torch.cat([h, h], dim=-1))


def _student(rank=8, phase_steps=3, decay="cosine"):
    torch.manual_seed(0)
    net = _Net()
    aux_cfg = AuxConfig(enabled=True, rank=rank, phase_steps=phase_steps, decay=decay)
    quantize_(net, QuantConfig(weight_bits=3, act_bits=8), None, aux_cfg)
    x = torch.randn(4, 16)
    for layer in (net.a, net.b, net.c):
        layer.act_quantizer.set_timesteps([0])
        layer.act_quantizer.scale.data.fill_(0.05)
    return net, aux_cfg, x


def _ranks(net):
    return [None if layer.aux is None else layer.aux.rank for layer in (net.a, net.b, net.c)]


def test_rank_halves_each_phase_and_phi_is_deleted_at_the_end():
    net, aux_cfg, _ = _student(rank=8, phase_steps=3)
    params = quant_parameters(net)
    optimizer = torch.optim.Adam(params.aux + params.weight_scales, lr=1e-3)
    decay = RankDecay(net, aux_cfg, optimizer=optimizer)
    assert decay.num_phases == 4 and decay.end_step == 12
    expected = {0: [8, 8, 3], 2: [8, 8, 3], 3: [4, 4, 3], 6: [2, 2, 2], 9: [1, 1, 1],
                11: [1, 1, 1], 12: [None, None, None]}
    for step in range(13):
        decay.step(step)
        if step in expected:
            assert _ranks(net) == expected[step], step
        if step < 12:  # the optimizer keeps working across re-factoring
            net(torch.randn(2, 16), 0).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert decay.current_rank == 0 and decay.finished
    assert not any("aux" in key for key in net.state_dict())
    remaining = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not remaining & {id(p) for p in params.aux}
    assert quant_parameters(net).aux == []


@pytest.mark.parametrize("decay_kind, expected", [
    ("cosine", [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
    ("linear", [1.0, 0.75, 0.5, 0.25]),
])
def test_bottom_half_fades_within_a_phase(decay_kind, expected):
    net, aux_cfg, _ = _student(rank=8, phase_steps=4, decay=decay_kind)
    decay = RankDecay(net, aux_cfg)
    for step, factor in enumerate(expected):
        decay.step(step)
        assert decay.factor == pytest.approx(factor)
        mask = net.a.aux.mask.tolist()
        assert mask[:4] == [1.0] * 4 and mask[4:] == pytest.approx([factor] * 4)


def test_phase_end_refactor_keeps_the_top_half_product():
    net, aux_cfg, _ = _student(rank=8, phase_steps=3)
    decay = RankDecay(net, aux_cfg)
    decay.step(2)
    with torch.no_grad():
        net.a.aux.mask[4:] = 0.0
        faded = net.a.aux.weight().clone()
    full = net.a.aux.L @ net.a.aux.R
    decay.step(3)
    assert net.a.aux.rank == 4
    torch.testing.assert_close(net.a.aux.weight(), faded, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(net.a.aux.weight(), full)


def test_spread_schedule_ends_within_the_run_and_finish_removes_phi():
    net, _, _ = _student()
    decay = RankDecay(net, AuxConfig(enabled=True, rank=8), total_steps=100)
    assert decay.end_step <= 99
    decay.step(decay.end_step)
    assert _ranks(net) == [None, None, None]
    other, aux_cfg, _ = _student()
    RankDecay(other, aux_cfg).finish()
    assert _ranks(other) == [None, None, None]
    with pytest.raises(ValueError, match="total_steps"):
        RankDecay(other, AuxConfig(enabled=True))


def test_resume_mid_schedule_from_a_state_dict():
    net, aux_cfg, x = _student(rank=8, phase_steps=3)
    decay = RankDecay(net, aux_cfg)
    decay.step(7)
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    output = net(x, 0)
    fresh, _, _ = _student(rank=8, phase_steps=3)
    resumed = RankDecay(fresh, aux_cfg)
    resumed.step(7)
    fresh.load_state_dict(saved)
    assert _ranks(fresh) == [2, 2, 2]
    torch.testing.assert_close(fresh(x, 0), output)
