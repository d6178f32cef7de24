"""Hadamard rotation of Linear inputs: the matrices, what rotating buys, and refusals."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from qdiff.config import QuantConfig
from qdiff.export.format import ExportFormatError, LayerSpec
from qdiff.quant import QuantLinear, quantize_
from qdiff.quant.layers import QuantLayer
from qdiff.quant.rotation import HadamardRotation

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("size", [1, 2, 8, 12, 20, 24, 96, 1536, 1920])
def test_the_rotation_is_a_hadamard_matrix(size):
    """Orthogonal with every entry +-1/sqrt(size): no channel can keep a token's range."""
    h = HadamardRotation(size).matrix().double()
    assert h.shape == (size, size)
    torch.testing.assert_close(h @ h.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(h.abs(), torch.full_like(h, 1 / math.sqrt(size)), rtol=1e-6, atol=0)


def test_powers_of_two_are_sylvester_and_others_take_the_smallest_paley_factor():
    """The Paley factor is a dense matmul per token: 1536 must be 12 x 128, not 384 x 4;
    Sylvester parts above 128 are split into near-equal factors (kron of Sylvesters)."""
    sylvester = torch.tensor([[1., 1., 1., 1.], [1., -1., 1., -1.], [1., 1., -1., -1.], [1., -1., -1., 1.]])
    torch.testing.assert_close(HadamardRotation(4).matrix() * 2, sylvester, rtol=0, atol=1e-6)
    sizes = {width: HadamardRotation(width).factor_sizes
             for width in (1, 256, 4096, 96, 1536, 1920, 3072, 5120, 8960)}
    assert sizes == {1: (), 256: (16, 16), 4096: (64, 64), 96: (12, 8), 1536: (12, 128),
                     1920: (60, 32), 3072: (12, 16, 16), 5120: (20, 16, 16), 8960: (140, 64)}


@pytest.mark.parametrize("size", [96, 256, 1536])
def test_the_factored_transform_is_the_kronecker_product(size):
    """x @ H computed factor by factor equals x @ kron(P, S) / sqrt(width) built whole."""
    rotation = HadamardRotation(size).double()
    q = rotation.paley_size - 1
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < size // (q + 1):
        sylvester = torch.kron(torch.tensor([[1., 1.], [1., -1.]], dtype=torch.float64), sylvester)
    whole = sylvester if q == 0 else torch.kron(_paley_by_definition(q), sylvester)
    x = torch.randn(7, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(rotation(x), x @ whole / math.sqrt(size), rtol=0, atol=1e-12)


def _paley_by_definition(q: int) -> torch.Tensor:
    """I + S, S the skew Jacobsthal matrix bordered by ones: S[i][j] = chi(j - i) for the
    quadratic character chi of GF(q), first row +1 and first column -1 off the corner."""
    chi = [0.0] + [1.0 if pow(d, (q - 1) // 2, q) == 1 else -1.0 for d in range(1, q)]
    skew = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    skew[0, 1:], skew[1:, 0] = 1.0, -1.0
    for i in range(q):
        for j in range(q):
            skew[i + 1, j + 1] = chi[(j - i) % q]
    return torch.eye(q + 1, dtype=torch.float64) + skew


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [16, 96])
def test_the_fast_transform_multiplies_by_the_matrix(size, dtype):
    rotation = HadamardRotation(size).to(dtype)
    x = torch.randn(3, 5, size, generator=torch.Generator().manual_seed(0), dtype=dtype)
    y = rotation(x)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, x @ rotation.matrix().to(dtype), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths


@pytest.mark.parametrize("size", [6, 10, 35, 100])
def test_widths_without_a_hadamard_matrix_are_refused_with_the_fix(size):
    with pytest.raises(ValueError, match=rf"No Hadamard rotation of width {size}: .* out of quant.rotate_inputs"):
        HadamardRotation(size)


def _per_token_layer(module: nn.Linear, act_bits: int, rotate: bool) -> QuantLayer:
    cfg = QuantConfig(weight_bits=8, act_bits=act_bits, act_mode="dynamic_per_token", act_timestep_groups=1)
    return QuantLinear.from_module(copy.deepcopy(module), 8, act_bits, cfg, rotate_input=rotate)


def _relative_error(layer: QuantLayer, module: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = module(x)
        return float((layer(x) - expected).norm() / expected.norm())


def test_a_rotated_layer_computes_the_float_layer():
    """At W8A8 what is left is 8-bit rounding: the rotation cancels between input and weight."""
    torch.manual_seed(0)
    module, x = nn.Linear(24, 16), torch.randn(3, 7, 24)
    plain = _relative_error(_per_token_layer(module, 8, rotate=False), module, x)
    rotated = _relative_error(_per_token_layer(module, 8, rotate=True), module, x)
    assert rotated < 1e-2 and plain < 1e-2


def test_rotation_spreads_an_outlier_channel_and_lowers_the_4_bit_error():
    """A few large channels set every token's range; rotated, they share it with the rest."""
    torch.manual_seed(0)
    module, x = nn.Linear(96, 32), torch.randn(4, 16, 96)
    x[..., 5] *= 30.0
    plain = _relative_error(_per_token_layer(module, 4, rotate=False), module, x)
    rotated = _relative_error(_per_token_layer(module, 4, rotate=True), module, x)
    assert rotated < 0.5 * plain, (rotated, plain)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.wide = nn.Linear(10, 8)
        self.conv = nn.Conv2d(8, 8, 1)


@pytest.mark.parametrize("patterns, message", [
    (["proj", "*typo*"], r"quant.rotate_inputs \['\*typo\*'\] match\(es\) no quantized layer"),
    (["*"], r"matches \['conv'\], which are not Linear layers"),
    (["wide"], r"No Hadamard rotation of width 10: .* out of quant.rotate_inputs"),
])
def test_quantize_refuses_bad_rotation_patterns_before_touching_the_model(patterns, message):
    model = _Block()
    with pytest.raises(ValueError, match=message):
        quantize_(model, QuantConfig(rotate_inputs=patterns))
    assert all(type(module) in (nn.Linear, nn.Conv2d) for module in model.children())


def test_quantize_rotates_the_matched_layers_only_and_reports_it():
    model = _Block()
    report = quantize_(model, QuantConfig(rotate_inputs=["proj"]))
    assert model.proj.input_rotation is not None and model.conv.input_rotation is None
    assert "input rotated" in next(row.note for row in report.rows if row.name == "proj")
    assert not any("rotation" in key for key in model.state_dict())  # rebuilt from the width
    with pytest.raises(ValueError, match="rotate the input or split it, not both"):
        model.proj.split_input([4, 4], QuantConfig())


def test_layer_spec_reads_old_files_as_unrotated_and_refuses_bad_rotations():
    spec = LayerSpec("Linear", 4, False, 4, False, "per_token", 10, (8, 12), (), "hadamard")
    assert LayerSpec.from_json("x", spec.to_json(), Path("c.json")) == spec
    old = {key: value for key, value in spec.to_json().items() if key != "input_rotation"}
    assert LayerSpec.from_json("x", old, Path("c.json")).input_rotation == "none"
    with pytest.raises(ExportFormatError, match="c.json: layer 'x': input_rotation 'random' is not one of"):
        LayerSpec.from_json("x", {**spec.to_json(), "input_rotation": "random"}, Path("c.json"))
    conv = {**spec.to_json(), "type": "Conv2d", "weight_shape": [8, 12, 1, 1]}
    with pytest.raises(ExportFormatError, match="only a Linear layer can rotate its input"):
        LayerSpec.from_json("x", conv, Path("c.json"))
