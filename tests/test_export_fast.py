"""Fast integer kernels: the same numbers as the export's reference path, and the switch.

Units (int8 operands, exact int8 sums, im2col), layers on every registered kernel against
their reference forward, the kernel choice ("auto" by measurement, forced kernels,
errors), the registry (a new kernel is one class and a registration), the one-copy weight
storage, and whole exported denoisers of every family against their reference path.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch.nn import functional as F

from qdiff.errors import QdiffError
from qdiff.export import IntLayer
from qdiff.export.freeze import freeze_layer
from qdiff.kernels import (Int8Weight, Kernel, available_kernels, choice, default_kernel, get_kernel,
                           kernel_names, one_pass, onednn_gemm, register_kernel, registry, unregister_kernel)
from qdiff.kernels.float_sum import float_sum
from qdiff.kernels.im2col import im2col
from qdiff.kernels.int8_gemm import int8_sum
from qdiff.quant import TimestepContext
from qdiff.quant.primitives import int_range
from test_export_families import CALLS, FAMILIES, _denoiser, _export
from test_export_units import MODULES, _shape, _student_layer

pytestmark = pytest.mark.usefixtures("one_thread")
needs_onednn = pytest.mark.skipif(not onednn_gemm.available(torch.device("cpu")),
                                  reason="this PyTorch build has no oneDNN quantized linear")
BUILT_IN = ("int8", "onednn", "onednn-im2col", "float")


@pytest.mark.parametrize("bits, symmetric, centred", [(4, False, True), (3, True, True), (8, True, True),
                                                      (8, False, False)])
def test_int8_weight_holds_the_codes_exactly(bits, symmetric, centred):
    gen = torch.Generator().manual_seed(bits)
    qmin, qmax = int_range(bits, symmetric)
    codes = torch.randint(qmin, qmax + 1, (6, 5, 3, 3), generator=gen)
    zero = torch.zeros(6) if symmetric else torch.randint(qmin, qmax + 1, (6,), generator=gen).float()
    if not symmetric:
        zero[0] = qmin  # 8-bit asymmetric: a zero point at the edge does not centre into int8
    weight = Int8Weight.from_codes(codes, zero, bits, qmin)
    assert weight.matrix.dtype == torch.int8 and weight.matrix.shape == (6, 45)
    assert weight.centred == centred
    assert torch.equal(weight.codes(zero, (6, 5, 3, 3)), codes.to(torch.int16))


def _operands(gen, rows, inner, cols, act_bits, weight_bits):
    qmin, qmax = int_range(act_bits, False)
    a = torch.randint(qmin, qmax + 1, (rows, inner), generator=gen)
    za = torch.randint(qmin, qmax + 1, (rows,), generator=gen)
    wmin, wmax = int_range(weight_bits, False)
    w = torch.randint(wmin, wmax + 1, (cols, inner), generator=gen)
    zw = torch.randint(wmin, wmax + 1, (cols,), generator=gen)
    a[0], za[0], w[0], zw[0] = qmax, qmin, wmax, wmin  # the largest products first
    return a, za, w, zw, qmin


def exact_sum_case(rows, inner, cols, act_bits, weight_bits):
    """(int8 activations, their residual zero points, Int8Weight, the exact int64 sums)."""
    gen = torch.Generator().manual_seed(rows + act_bits)
    a, za, w, zw, qmin = _operands(gen, rows, inner, cols, act_bits, weight_bits)
    offset = qmin + 2 ** (act_bits - 1)
    expected = (a - za[:, None]) @ (w - zw[:, None]).t()  # int64
    u, a_zero = (a - offset).to(torch.int8), (za - offset).to(torch.int32)
    return u, a_zero, Int8Weight.from_codes(w, zw, weight_bits, 0), expected


@pytest.mark.parametrize("act_bits, weight_bits", [(4, 4), (8, 4), (8, 8)])
@pytest.mark.parametrize("rows, inner, cols", [(1, 7, 3), (40, 300, 24)])
def test_int8_and_float_sums_are_exact(act_bits, weight_bits, rows, inner, cols):
    u, a_zero, weight, expected = exact_sum_case(rows, inner, cols, act_bits, weight_bits)
    assert torch.equal(int8_sum(u, a_zero, weight).long(), expected)
    assert torch.equal(float_sum(u, a_zero, weight, torch.float64).long(), expected)


@needs_onednn
@pytest.mark.parametrize("act_bits, weight_bits", [(4, 4), (8, 4), (3, 3)])
@pytest.mark.parametrize("rows, inner, cols", [(1, 7, 3), (40, 300, 24)])
def test_onednn_sums_are_exact(act_bits, weight_bits, rows, inner, cols):
    gen = torch.Generator().manual_seed(rows + act_bits)
    a, za, w, _, qmin = _operands(gen, rows, inner, cols, act_bits, weight_bits)
    za[:] = za[0]  # one zero point for every row (all samples at one timestep)
    weight = Int8Weight.from_codes(w, torch.full((cols,), 2 ** (weight_bits - 1)), weight_bits, 0)
    offset = qmin + 2 ** (act_bits - 1)
    u, a_zero = (a - offset).to(torch.int8), (za - offset).to(torch.int32)
    assert onednn_gemm.exact_for(weight, a_zero)
    expected = int8_sum(u, a_zero, weight)
    got = get_kernel("onednn").linear(onednn_gemm.shifted(u), a_zero, weight, 2 ** act_bits - 1)
    assert got.dtype == torch.float32 and torch.equal(got.long(), expected.long())
    assert weight.plain is None and torch.equal(weight.matrix, (w - 2 ** (weight_bits - 1)).to(torch.int8))


def test_onednn_is_refused_where_its_sum_could_differ():
    """8-bit weights can saturate its int16 pair sums (CPUs without VNNI); rows with
    different zero points do not fit its one scalar zero point."""
    four_bit = Int8Weight(torch.randint(-8, 8, (3, 5), dtype=torch.int8), torch.zeros(3))
    eight_bit = Int8Weight(torch.randint(-127, 128, (3, 5), dtype=torch.int8), torch.zeros(3))
    assert onednn_gemm.exact_for(four_bit, None)
    assert onednn_gemm.exact_for(four_bit, torch.tensor([2, 2, 2], dtype=torch.int32))
    assert not onednn_gemm.exact_for(four_bit, torch.tensor([2, 2, 3], dtype=torch.int32))
    assert not onednn_gemm.exact_for(eight_bit, None)


def test_auto_times_every_available_exact_kernel_plain_readers_first(monkeypatch):
    cpu = torch.device("cpu")
    names = [k.name for k in registry.candidates("auto", cpu, lambda kernel: True)]
    assert names == (["int8", "float", "onednn", "onednn-im2col"] if onednn_gemm.available(cpu) else ["int8", "float"])
    assert [k.name for k in registry.candidates("auto", cpu, lambda kernel: kernel.name != "int8")][0] == "float"
    monkeypatch.setattr(onednn_gemm, "_BUILT", False)
    assert [k.name for k in registry.candidates("auto", cpu, lambda kernel: True)] == ["int8", "float"]


@needs_onednn
@pytest.mark.parametrize("winner", ["int8", "onednn", "onednn-im2col"])
def test_auto_keeps_one_copy_of_the_weight_in_the_winners_form(winner, monkeypatch):
    """Timing packs the weight for oneDNN; a winner that reads the plain matrix gets it back,
    and later shapes choose only among kernels that read the copy kept."""
    monkeypatch.setattr(choice, "_CHOICES", {})
    monkeypatch.setattr(choice, "seconds", lambda run, *args: 0.0 if run.__defaults__[0].name == winner else 1.0)
    layer, shape = _frozen("conv", (4, 4), "temporal", False)
    x = torch.randn(2, *shape)
    expected = _run(layer, x, "reference", torch.tensor([900, 900]))
    layer.set_kernel("auto")
    got = _run(layer, x, "auto", torch.tensor([900, 900]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))
    assert list(layer.chosen.values()) == [winner]
    held = layer.int8.packed_by
    assert held is (None if winner == "int8" else get_kernel(winner)) and (layer.int8.plain is None) == (held is not None)
    with torch.no_grad(), layer.act.context.use(torch.tensor([900])):
        layer(x[:1])  # another shape: no form change
    assert layer.int8.packed_by is held and len(layer.chosen) == 2


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)), ((3, 2), (1, 2), (2, 0), (2, 1)),
    ((1, 1), (1, 1), (0, 0), (1, 1)), ((2, 3, 3), (1, 2, 2), (1, 1, 1), (1, 1, 1))])
def test_im2col_patches_give_the_convolution(kernel, stride, padding, dilation):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (2, 3, *(5,) * len(kernel)), generator=gen, dtype=torch.int8)
    weight = torch.randint(-8, 8, (4, 3, *kernel), generator=gen)
    fill = torch.tensor([0, 3], dtype=torch.int8)  # the padding is each sample's zero point
    patches = im2col(codes, kernel, stride, padding, dilation, fill).long()
    conv = F.conv2d if len(kernel) == 2 else F.conv3d
    padded = F.pad(codes.double(), [p for p in reversed(padding) for _ in range(2)])
    padded[1][F.pad(torch.ones(codes.shape[1:]), [p for p in reversed(padding) for _ in range(2)]) == 0] = 3
    expected = conv(padded, weight.double(), stride=stride, dilation=dilation).round().long()
    got = patches @ weight.movedim(1, -1).reshape(4, -1).t()
    assert torch.equal(got.view(2, *expected.shape[2:], 4).movedim(-1, 1), expected)


LAYER_CASES = [((4, 4), "temporal", False), ((4, 8), "temporal", False), ((8, 8), "temporal", True),
               ((3, 3), "temporal", False), ((4, 8), "dynamic_per_token", False)]


def _frozen(kind, bits, mode, symmetric):
    torch.manual_seed(0)
    layer, _ = _student_layer(MODULES[kind](), *bits, mode=mode, symmetric=symmetric)
    return freeze_layer("layer", layer, TimestepContext()), _shape(layer.base_layer)


def _run(layer, x, kernel, timesteps):
    layer.set_kernel(kernel)
    with torch.no_grad(), layer.act.context.use(timesteps):
        return layer(x)


ROUNDING = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7}  # of the output's largest magnitude


def rounding_close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to the float rounding of the rescale (oneDNN's fused epilogue orders it its way)."""
    atol = ROUNDING[expected.dtype] * float(expected.abs().max())
    return got.dtype == expected.dtype and bool(((got - expected).abs() <= atol).all())


def layer_case(kind, bits, mode, symmetric, dtype):
    """(frozen integer layer in `dtype`, an input batch of 3, one timestep per sample)."""
    layer, shape = _frozen(kind, bits, mode, symmetric)
    x = (torch.randn(3, *shape, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    return layer.to(dtype), x, torch.tensor([900, 120, 480])


def test_the_built_in_kernels_are_registered_in_order():
    assert kernel_names() == ("auto", *BUILT_IN, "reference")
    assert {"int8", "float"} <= set(available_kernels(torch.device("cpu"))) <= set(BUILT_IN)


@pytest.mark.parametrize("kernel", [*available_kernels(torch.device("cpu")), "auto"])
@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("bits, mode, symmetric", LAYER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_kernel_gives_the_reference_output(kernel, kind, bits, mode, symmetric, dtype):
    layer, x, timesteps = layer_case(kind, bits, mode, symmetric, dtype)
    expected = _run(layer, x, "reference", timesteps)
    got = _run(layer, x, kernel, timesteps)
    assert got.dtype == dtype and got.stride() == expected.stride()  # the next op rounds alike
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


def test_fast_kernels_hold_one_copy_of_the_codes_and_save_them_packed():
    layer, shape = _frozen("conv", (4, 8), "temporal", False)
    packed = layer.weight_packed.clone()
    _run(layer, torch.randn(2, *shape), "int8", torch.tensor([900]))
    assert layer.int8 is not None and layer.weight_packed.numel() == 0
    assert torch.equal(layer.state_dict()["weight_packed"], packed)
    again = copy.deepcopy(layer)
    again.load_state_dict(layer.state_dict())  # into a layer that holds int8 operands
    assert again.int8 is None and torch.equal(again.weight_packed, packed)
    layer.set_kernel("reference")
    assert layer.int8 is None and torch.equal(layer.weight_packed, packed)


@needs_onednn
def test_onednn_holds_only_its_packed_copy_and_gives_the_codes_back():
    layer, shape = _frozen("conv", (4, 4), "temporal", False)
    packed = layer.weight_packed.clone()
    x = torch.randn(2, *shape)
    expected = _run(layer, x, "reference", torch.tensor([900]))
    assert rounding_close(_run(layer, x, "onednn", torch.tensor([900])), expected)
    assert layer.int8.plain is None and layer.int8.packed_by is get_kernel("onednn")
    assert torch.equal(layer.state_dict()["weight_packed"], packed)
    copied = copy.deepcopy(layer)  # oneDNN's copy has no storage: the copy holds the plain matrix
    assert copied.int8.packed is None and rounding_close(_run(copied, x, "onednn", torch.tensor([900])), expected)
    layer.double()  # device and dtype moves act on the plain matrix
    assert layer.int8.packed is None and layer.int8.plain is not None
    layer.float()
    assert rounding_close(_run(layer, x, "onednn", torch.tensor([900])), expected)
    layer.set_kernel("int8")
    assert layer.int8.packed is None and torch.equal(_run(layer, x, "int8", torch.tensor([900])), expected)


@needs_onednn
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_onednn_forward_never_decodes_its_packed_copy(kind, monkeypatch):
    layer, shape = _frozen(kind, (4, 4), "temporal", False)
    x = torch.randn(2, *shape)
    expected = _run(layer, x, "onednn", torch.tensor([900]))  # packs on first use
    decoded = []
    unpack = onednn_gemm.unpack
    monkeypatch.setattr(onednn_gemm, "unpack", lambda packed: decoded.append(1) or unpack(packed))
    assert torch.equal(_run(layer, x, "onednn", torch.tensor([900])), expected)
    assert not decoded  # decoding costs about a millisecond per layer and call (SD-sized)


def test_int8_kernel_runs_int_mm_and_float_kernel_does_not(monkeypatch):
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or int_mm(a, b))
    for kind in ("linear", "conv"):
        layer, shape = _frozen(kind, (4, 4), "temporal", False)
        _run(layer, torch.randn(2, *shape), "float", torch.tensor([900]))
        assert not calls
        _run(layer, torch.randn(2, *shape), "int8", torch.tensor([900]))
        assert len(calls) == 1
        calls.clear()


def test_auto_times_the_candidates_once_and_keeps_the_faster(monkeypatch):
    monkeypatch.setattr(choice, "_CHOICES", {})
    clock = itertools.count()
    cost = {"int8": 5, "float": 2}
    ran = []

    def candidate(name):
        def run():
            ran.append(name)
            for _ in range(cost[name] - 1):
                next(clock)
            return name
        return run

    timer = lambda: float(next(clock))  # noqa: E731  (a fake clock: each run advances it by its cost)
    candidates = {name: candidate(name) for name in cost}
    assert choice.pick("key", candidates, torch.device("cpu"), timer) == "float"
    assert choice.choices() == {"key": "float"}
    ran.clear()
    assert choice.pick("key", candidates, torch.device("cpu"), timer) == "float"
    assert ran == ["float"]  # remembered: no more timing


def test_unknown_kernels_are_refused_with_the_choices(monkeypatch):
    layer, _ = _frozen("linear", (4, 4), "temporal", False)
    with pytest.raises(QdiffError, match=r"Unknown qdiff kernel 'int4'; choose one of \('auto', 'int8'") as error:
        layer.set_kernel("int4")
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)
    monkeypatch.setenv("QDIFF_KERNEL", "reference")
    assert _frozen("linear", (4, 4), "temporal", False)[0].kernel == "reference"
    monkeypatch.setenv("QDIFF_KERNEL", "fast")
    with pytest.raises(QdiffError, match="QDIFF_KERNEL='fast' is not a qdiff kernel"):
        _frozen("linear", (4, 4), "temporal", False)


class ToyKernel(Kernel):
    """A float64 matmul on the centred codes: a new kernel is this class and a registration."""

    calls = 0

    def linear(self, a, a_zero, weight, levels):
        ToyKernel.calls += 1
        values = a.double() if a_zero is None else a.double() - a_zero[:, None].double()
        return values @ (weight.matrix.double() - weight.zero_shift[:, None].double()).t()


def _outputs(model, family):
    with torch.no_grad():
        return [CALLS[FAMILIES[family].call](model, t, torch.Generator().manual_seed(4), torch.float32)
                for t in (torch.tensor(900.0), torch.tensor([20.0, 600.0]))]


def test_a_kernel_registered_from_outside_runs_an_exported_model_exactly(tmp_path, monkeypatch):
    family = "class-ldm-w4a4"
    model = _denoiser(_export(family, tmp_path / "export")[3])
    expected = _outputs(model.set_qdiff_kernel("reference"), family)
    ToyKernel.calls = 0
    register_kernel("toy")(ToyKernel)
    try:
        assert kernel_names() == ("auto", *BUILT_IN, "toy", "reference")
        assert "toy" in available_kernels(torch.device("cpu"))
        monkeypatch.setenv("QDIFF_KERNEL", "toy")
        assert default_kernel() == "toy"
        with pytest.raises(ValueError, match="'toy' is taken"):
            register_kernel("toy")(ToyKernel)
        got = _outputs(model.set_qdiff_kernel("toy"), family)
    finally:
        unregister_kernel("toy")
    assert ToyKernel.calls > 0 and all(m.kernel == "toy" for m in model.modules() if isinstance(m, IntLayer))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5 * float(e.abs().max()))
    assert kernel_names() == ("auto", *BUILT_IN, "reference")
    with pytest.raises(QdiffError, match=r"Unknown qdiff kernel 'toy'; choose one of \('auto', 'int8', 'onednn', 'onednn-im2col', "
                                         r"'float', 'reference'\)"):
        model.set_qdiff_kernel("toy")


@pytest.mark.parametrize("codes", ["eager", "one pass"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_denoisers_of_every_family_match_their_reference_path(family, codes, tmp_path, monkeypatch):
    """On every kernel; with the activation codes of every layer from the eager chain, or
    from the compiled one-pass loop however small the layer (`one_pass.MIN_ELEMENTS`)."""
    monkeypatch.setattr(one_pass, "MIN_ELEMENTS", 0 if codes == "one pass" else 1 << 62)
    _, _, _, loaded = _export(family, tmp_path / "export")
    model = _denoiser(loaded)
    outputs = {}
    for kernel in ("reference", *BUILT_IN, "auto"):
        model.set_qdiff_kernel(kernel)
        with torch.no_grad():
            outputs[kernel] = [CALLS[FAMILIES[family].call](model, t, torch.Generator().manual_seed(4),
                                                            torch.float32)
                               for t in (torch.tensor(900.0), torch.tensor([20.0, 600.0]))]
    assert all(isinstance(m, IntLayer) and m.kernel == "auto" for m in model.modules()
               if isinstance(m, IntLayer))
    for kernel in (*BUILT_IN, "auto"):
        for got, expected in zip(outputs[kernel], outputs["reference"]):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


@needs_onednn
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_torch_compile_of_onednn_needs_freezing_and_then_gives_the_same_outputs(kind):
    """Without freezing inductor cannot lower oneDNN's kernel (its weight must be a constant):
    the error says how to compile, not inductor's assertion. With freezing, a new timestep
    is an input of the compiled graph, not a frozen constant: no recompile."""
    layer, shape = _frozen(kind, (4, 4), "temporal", False)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    steps = [torch.tensor([t] * 3) for t in (900, 500, 100)]  # one activation zero point each: oneDNN runs
    expected = [_run(layer, x, "reference", t) for t in steps]
    assert rounding_close(_run(layer, x, "onednn", steps[0]), expected[0])  # eager first: packs the weight
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            with layer.act.context.use(steps[0]), pytest.raises(RuntimeError, match=r"freezing = True"):
                torch.compile(layer)(x)
            torch._dynamo.reset()
            with torch._inductor.config.patch(freezing=True):
                compiled = torch.compile(layer, fullgraph=True)
                with layer.act.context.use(steps[0]):
                    got = [compiled(x)]
                with torch._dynamo.config.patch(error_on_recompile=True):
                    for t in steps[1:]:
                        with layer.act.context.use(t):
                            got.append(compiled(x))
    finally:
        torch._dynamo.reset()
    assert all(rounding_close(g, e) for g, e in zip(got, expected)) and len(got) == 3


def test_torch_compile_gives_the_same_outputs():
    """A padded convolution with the W4A8 correction and im2col; inductor compiles it whole."""
    layer, shape = _frozen("conv", (4, 8), "temporal", False)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    timesteps = torch.tensor([900, 120, 480])
    expected = _run(layer, x, "reference", timesteps)
    layer.set_kernel("int8")
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad(), layer.act.context.use(timesteps):
        got = compiled(x)
    assert torch.equal(got, expected)
