"""The moving average of the trained parameters: its arithmetic, its swap, what it leaves out."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qdiff.config import AuxConfig, ConfigError, LoRAConfig, QuantConfig
from qdiff.distill.ema import ParameterEMA
from qdiff.quant import quant_parameters, quantize_


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, timestep: int) -> torch.Tensor:
        return self.b(self.a(x))


def _student(aux: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = _Net()
    quantize_(net, QuantConfig(weight_bits=4, act_bits=8), LoRAConfig(rank=2),
              AuxConfig(enabled=aux, rank=2))
    for layer in (net.a, net.b):
        layer.act_quantizer.set_timesteps([0])
        layer.act_quantizer.scale.data.fill_(0.05)
    params = quant_parameters(net)
    net.requires_grad_(False)
    for param in params.lora + params.weight_scales + params.act_scales + params.aux:
        param.requires_grad_(True)
    return net


def _perturb(net: nn.Module, amount: float) -> None:
    with torch.no_grad():
        for param in net.parameters():
            if param.requires_grad:
                param.add_(amount)


def test_the_average_follows_the_live_parameters_with_the_warmed_up_decay():
    net = _student()
    start = {name: p.detach().clone() for name, p in net.named_parameters() if p.requires_grad}
    ema = ParameterEMA(net, decay=0.2)
    assert [ema.decay_at(step) for step in (0, 1, 5)] == pytest.approx([0.1, 2 / 11, 0.2])
    expected = dict(start)
    for step, amount in enumerate([1.0, -0.5, 2.0]):
        _perturb(net, amount)
        ema.update(step)
        d = ema.decay_at(step)
        live = {name: p.detach() for name, p in net.named_parameters() if p.requires_grad}
        expected = {name: d * expected[name] + (1 - d) * live[name] for name in expected}
    assert ema.shadow.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(ema.shadow[name], expected[name], msg=name)


@pytest.mark.parametrize("ramp", [2, 4])
def test_a_ramp_of_k_weights_step_s_as_s_to_the_k_minus_2(ramp):
    """Uncapped, the average after steps 0..n-1 of a value that is 0 at the start and s after
    step s: step s weighs (s + 2)...(s + k - 1), about s^(k-2) (k = 2: all alike), and the
    start what is left, n! (k - 1)! / (n + k - 1)!."""
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = ParameterEMA(net, decay=0.9999, ramp=float(ramp))
    n = 40
    for step in range(n):
        with torch.no_grad():
            net.weight.fill_(step)
        ema.update(step)
    weights = [math.prod(range(s + 2, s + ramp)) for s in range(n)]
    start = math.factorial(n) * math.factorial(ramp - 1) / math.factorial(n + ramp - 1)
    expected = sum(w * s for s, w in enumerate(weights)) / sum(weights) * (1 - start)
    assert ema.shadow["weight"].item() == pytest.approx(expected, rel=1e-5)


def test_averaged_swaps_the_average_in_and_the_live_parameters_back():
    net = _student()
    ema = ParameterEMA(net, decay=0.5)
    _perturb(net, 1.0)
    ema.update(0)  # shadow = 0.1 * start + 0.9 * live: not the live parameters
    live = {name: p.detach().clone() for name, p in net.named_parameters()}
    x = torch.randn(3, 8)
    with ema.averaged():
        for name, value in ema.shadow.items():
            assert torch.equal(dict(net.named_parameters())[name], value)
        averaged_output = net(x, 0)
    for name, param in net.named_parameters():
        assert torch.equal(param, live[name]), name
    assert not torch.allclose(averaged_output, net(x, 0))
    ema.copy_to_model()
    torch.testing.assert_close(net(x, 0), averaged_output, rtol=0, atol=0)


def test_phi_and_frozen_parameters_are_not_averaged():
    net = _student(aux=True)
    ema = ParameterEMA(net, decay=0.9)
    phi = {id(p) for p in quant_parameters(net).aux}
    named = dict(net.named_parameters())
    assert phi and not {id(named[name]) for name in ema.shadow} & phi
    assert all(named[name].requires_grad for name in ema.shadow)
    assert any("lora_A" in name for name in ema.shadow)
    assert not any(name.endswith("base_layer.weight") for name in ema.shadow)


def test_a_saved_average_of_another_student_is_refused():
    ema = ParameterEMA(_student(), decay=0.9)
    state = ema.state_dict()
    state["a.extra"] = torch.zeros(1)
    with pytest.raises(ConfigError, match="unexpected \\['a.extra'\\].*config changed"):
        ema.load_state_dict(state)
