"""The one-pass activation codes (the quantize chain compiled by inductor) against the eager
chain, to the last bit: at rounding ties, at the clip bounds, in float32 and bfloat16, for
every operand form (uint8 minus qmin, int8 minus an offset, int8 centred on per-row zero
points), channels-last for convolutions; and the eager fallback where inductor cannot
compile. (Every family's export on every kernel with the one pass forced on, against its
reference path: `test_export_fast`.)
"""

from __future__ import annotations

import logging

import pytest
import torch

from qdiff.kernels import one_pass

pytestmark = pytest.mark.usefixtures("one_thread")

OPERANDS = {  # (qmin, qmax, shift, dtype); "zp": the zero points themselves (centred)
    "uint8 4-bit": (0, 15, 0, torch.uint8),
    "uint8 8-bit signed grid": (-128, 127, -128, torch.uint8),
    "int8 offset": (0, 255, 128, torch.int8),
    "int8 centred 4-bit": (0, 15, "zp", torch.int8),
    "int8 centred 3-bit signed": (-4, 3, "zp", torch.int8),
}


@pytest.fixture
def always_one_pass(monkeypatch):
    """Every activation takes the compiled chain, however small."""
    monkeypatch.setattr(one_pass, "MIN_ELEMENTS", 0)
    assert not one_pass._COMPILED.failed


def _activation(dtype, scale, zero_point, qmin, qmax):
    """Random values, values whose x / s + zp lies exactly halfway between two codes (in
    `dtype`), and values beyond both clip bounds."""
    x = torch.randn(4, 96, 40, generator=torch.Generator().manual_seed(0)) * 4 * scale.max()
    halves = (torch.arange(qmin - 2, qmax + 2) + 0.5).repeat(12)[: 96 * 40 // 4]
    flat = x.view(4, -1)
    flat[0, : len(halves)] = (halves - zero_point.flatten()[0]) * scale.flatten()[0]
    flat[1, :8] = torch.tensor([1e4, -1e4, 0.0, -0.0, 3e38, -3e38, 1e-30, -1e-30])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("operand", list(OPERANDS))
@pytest.mark.parametrize("per_row", [False, True])
def test_one_pass_codes_equal_the_eager_chain_to_the_last_bit(operand, dtype, per_row, always_one_pass):
    qmin, qmax, shift, out_dtype = OPERANDS[operand]
    shape = (4, 96, 1) if per_row else ()
    scale = torch.full(shape, 0.0371) * (torch.rand(shape, generator=torch.Generator().manual_seed(1)) + 0.5)
    zero_point = torch.full(shape, float((qmin + qmax + 1) // 2)) + (torch.arange(4.0).view(4, 1, 1) % 2
                                                                     if per_row else 0)
    scale, zero_point = scale.to(dtype) if per_row else scale, zero_point.to(dtype) if per_row else zero_point
    shift = zero_point if shift == "zp" else shift
    x = _activation(dtype, scale.float(), zero_point.float(), qmin, qmax)
    got = one_pass.operand_codes(x, scale, zero_point, qmin, qmax, shift, out_dtype)
    expected = one_pass._chain(x, scale, zero_point, qmin, qmax, shift, out_dtype, torch.contiguous_format)
    assert one_pass._signature(x, scale, zero_point, qmin, qmax, shift, out_dtype, torch.contiguous_format) \
        in one_pass._COMPILED.fns
    assert not one_pass._COMPILED.failed
    assert got.dtype == out_dtype and torch.equal(got, expected)
    codes = got.int() + (zero_point.int() if isinstance(shift, torch.Tensor) else shift)
    assert int(codes.min()) == qmin and int(codes.max()) == qmax  # the clips were exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_convolution_operand_comes_channels_last_with_the_same_codes(dtype, always_one_pass):
    x = (torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(3)) * 2).to(dtype)
    scale, zero_point = torch.tensor(0.11), torch.tensor(7.0)
    got = one_pass.operand_codes(x, scale, zero_point, 0, 15, 0, torch.uint8, channels_last=True)
    expected = one_pass._chain(x, scale, zero_point, 0, 15, 0, torch.uint8, torch.contiguous_format)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    assert torch.equal(got, expected)


def test_where_inductor_cannot_compile_the_eager_chain_runs_after_one_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no C++ compiler found\nmore detail")
    compiled = one_pass._Compiled()
    monkeypatch.setattr(one_pass, "_COMPILED", compiled)
    monkeypatch.setattr(torch, "compile", lambda fn, **options: broken)
    monkeypatch.setattr(one_pass, "MIN_ELEMENTS", 0)
    x, scale, zero_point = torch.randn(2, 64, 32), torch.tensor(0.05), torch.tensor(8.0)
    expected = one_pass._chain(x, scale, zero_point, 0, 15, 0, torch.uint8, torch.contiguous_format)
    with caplog.at_level(logging.WARNING, logger=one_pass.__name__):
        first = one_pass.operand_codes(x, scale, zero_point, 0, 15, 0, torch.uint8)
        second = one_pass.operand_codes(x, scale, zero_point, 0, 15, 0, torch.uint8)
    assert torch.equal(first, expected) and torch.equal(second, expected) and compiled.failed
    assert [r.getMessage() for r in caplog.records] == [
        "qdiff: activation codes run unfused (torch.compile failed: InductorError: no C++ compiler found)"]
