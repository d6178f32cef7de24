"""The fused integer layer (oneDNN: quantize in one pass, rescale as the sum's epilogue;
convolutions on its convolution or as its linear over im2col patches) against the
reference path, and the per-layer memory of the kernel chosen per call shape.

Every fused kernel, layer kind and bit width runs through one table: where the batch shares one grid
(one timestep) the fused op must run and give the reference output up to the rescale's
float rounding; where samples have grids of their own it must not run, and the unfused
path gives the same numbers.
"""

from __future__ import annotations

import pytest
import torch

from qdiff.export import fast_path
from qdiff.kernels import get_kernel, onednn_fused, onednn_gemm, onednn_im2col
from test_export_fast import ROUNDING, _frozen, _run
from test_export_units import MODULES

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not onednn_gemm.available(torch.device("cpu")),
                                 reason="this PyTorch build has no oneDNN quantized ops")]
FUSES = {  # reflect padding: oneDNN pads with zeros only; im2col lays out one group only
    "onednn": {"linear": True, "conv": True, "conv-1x1": True, "conv-grouped-nobias": True,
               "conv-strided-reflect": False},
    "onednn-im2col": {"linear": True, "conv": True, "conv-1x1": True, "conv-grouped-nobias": False,
                      "conv-strided-reflect": False},
}
BITS = [((4, 8), False), ((4, 4), False), ((3, 3), False), ((4, 4), True)]


def _case(kind, bits, symmetric, dtype, rows=3):
    layer, shape = _frozen(kind, bits, "temporal", symmetric)
    x = (torch.randn(rows, *shape, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    return layer.to(dtype), x


@pytest.fixture
def fused_calls(monkeypatch):
    """The layers that ran a fused op (once each, though one kernel's form calls the other's)."""
    calls = []
    for cls in (onednn_gemm.OneDNNKernel, onednn_im2col.OneDNNIm2colKernel):
        def spy(self, layer, x, grid, conv, forward=cls.__dict__["fused_forward"]):
            if not calls or calls[-1] is not layer:
                calls.append(layer)
            return forward(self, layer, x, grid, conv)
        monkeypatch.setattr(cls, "fused_forward", spy)
    return calls


@pytest.mark.parametrize("kernel", list(FUSES))
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("bits, symmetric", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_timestep_runs_fused_and_gives_the_reference_output(kernel, kind, bits, symmetric, dtype, fused_calls):
    layer, x = _case(kind, bits, symmetric, dtype)
    timesteps = torch.tensor([480] * len(x))
    expected = _run(layer, x, "reference", timesteps)
    got = _run(layer, x, kernel, timesteps)
    assert fused_calls == ([layer] if FUSES[kernel][kind] else [])
    assert got.dtype == dtype and got.stride() == expected.stride()
    torch.testing.assert_close(got, expected, rtol=0, atol=ROUNDING[dtype] * float(expected.abs().max()))


@pytest.mark.parametrize("kernel", list(FUSES))
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_samples_at_different_timesteps_run_unfused_with_the_same_numbers(kernel, kind, fused_calls):
    layer, x = _case(kind, (4, 8), False, torch.float32)
    timesteps = torch.tensor([900, 120, 480])
    expected = _run(layer, x, "reference", timesteps)
    got = _run(layer, x, kernel, timesteps)
    assert not fused_calls
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("bits, symmetric", BITS)
def test_uint8_codes_are_the_reference_codes_shifted(bits, symmetric):
    layer, x = _case("linear", bits, symmetric, torch.float32)
    act = layer.act
    with act.context.use(torch.tensor([480] * len(x))):
        codes = act(x)
        scale, zero_point = act.shared_grid(x)
    u = onednn_fused.uint8_codes(x, scale, zero_point, act.qmin, act.qmax)
    assert u.dtype == torch.uint8 and torch.equal(u.long(), codes.codes.long() - act.qmin)


def test_weights_outside_the_int16_pair_bound_are_not_fused():
    """8-bit weights with |w - zw| up to 255: oneDNN's pairwise int16 sums could saturate."""
    layer, x = _case("linear", (8, 8), False, torch.float32)
    assert not get_kernel("onednn").fuses(layer, conv=False)
    expected = _run(layer, x, "reference", torch.tensor([480] * len(x)))
    torch.testing.assert_close(_run(layer, x, "onednn", torch.tensor([480] * len(x))), expected,
                               rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_the_kernel_chosen_for_a_call_shape_is_remembered_until_new_codes_arrive(monkeypatch):
    layer, x = _case("conv", (4, 8), False, torch.float32)
    asked = []
    candidates = fast_path.candidates
    monkeypatch.setattr(fast_path, "candidates", lambda *args: asked.append(1) or candidates(*args))
    timesteps = torch.tensor([480] * len(x))
    first = _run(layer, x, "auto", timesteps)

    def call(x):
        with torch.no_grad(), layer.act.context.use(timesteps[:len(x)]):
            return layer(x)
    assert torch.equal(call(x), first) and len(asked) == 1
    call(x[:2])  # another shape: chosen anew
    assert len(asked) == 2
    layer.load_state_dict(layer.state_dict())  # new codes: the choice may no longer hold
    call(x)
    assert len(asked) == 3
