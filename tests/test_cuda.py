"""The integer layers, the exported denoisers and the distillation loop on a CUDA GPU.

Skipped where there is none (CI never has one). The claims are the CPU's: every kernel
gives the export's reference numbers, here on CUDA and against the CPU reference. Whole
denoisers are compared in float64, layers in float32 too. TF32 is off (`no_tf32`): the
reference path's float32 convolutions would otherwise round their inputs to 10 bits on
this device only.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qdiff
from qdiff.distill import loop
from qdiff.export import IntLayer, export_pipeline
from qdiff.kernels.float_sum import float_sum
from qdiff.kernels.int8_gemm import int8_sum
from test_distill import _config, _held_out_loss
from test_export_families import CALLS, FAMILIES, _denoiser, _export
from test_export_fast import LAYER_CASES, _run, exact_sum_case, layer_case
from test_export_units import MODULES

CUDA = torch.device("cuda")
FAST = ("int8", "float", "auto")
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("one_thread", "no_tf32")]


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _close(got: torch.Tensor, expected: torch.Tensor, relative: float, what: str) -> None:
    torch.testing.assert_close(got.cpu(), expected.cpu(), rtol=0,
                               atol=relative * float(expected.abs().max()), msg=what)


# (rows, inner, cols): _int_mm's CUDA rules (rows > 16, inner and cols multiples of 8) met
# by zero padding, and a shape that needs none
@pytest.mark.parametrize("act_bits, weight_bits", [(4, 4), (8, 4), (8, 8)])
@pytest.mark.parametrize("rows, inner, cols", [(1, 7, 3), (17, 8, 16), (40, 300, 24)])
def test_int8_and_float_sums_are_exact_on_cuda(act_bits, weight_bits, rows, inner, cols):
    u, a_zero, weight, expected = exact_sum_case(rows, inner, cols, act_bits, weight_bits)
    u, a_zero, weight = u.to(CUDA), a_zero.to(CUDA), weight.to(CUDA)  # expected stays on the CPU
    assert torch.equal(int8_sum(u, a_zero, weight).long().cpu(), expected)
    assert torch.equal(float_sum(u, a_zero, weight, torch.float64).long().cpu(), expected)


def _layer_tolerance(kernel: str, dtype: torch.dtype) -> float:
    """The fast kernels' sums are exact and their rescale is elementwise, as on the CPU; the
    reference kernel's float32 sums may take another order (cuDNN picks the algorithm)."""
    if dtype == torch.float64:
        return 1e-9
    return 1e-5 if kernel == "reference" else 1e-6


@pytest.mark.parametrize("kind", MODULES)
@pytest.mark.parametrize("bits, mode, symmetric", LAYER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integer_layers_on_cuda_give_the_cpu_reference_output(kind, bits, mode, symmetric, dtype):
    layer, x, timesteps = layer_case(kind, bits, mode, symmetric, dtype)
    expected = _run(layer, x, "reference", timesteps)
    on_cuda = copy.deepcopy(layer).to(CUDA)
    for kernel in ("reference", *FAST):
        got = _run(on_cuda, x.to(CUDA), kernel, timesteps.to(CUDA))
        assert got.device.type == "cuda" and got.dtype == dtype
        _close(got, expected, _layer_tolerance(kernel, dtype), f"kernel {kernel}")


def _outputs(model, family: str, device: torch.device) -> list[torch.Tensor]:
    """The family's two calls (one timestep, two timesteps) in float64, inputs drawn on the CPU."""
    def on_device(*args, **kwargs):
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return model(*map(move, args), **{k: move(v) for k, v in kwargs.items()})

    with torch.no_grad():
        return [CALLS[FAMILIES[family].call](on_device, t, torch.Generator().manual_seed(4), torch.float64)
                for t in (torch.tensor(900.0), torch.tensor([20.0, 600.0]))]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_exported_denoisers_of_every_family_on_cuda_match_the_cpu(family, tmp_path):
    """In float64, where rounding cannot move an activation code (in float32 a value that
    rounding puts on a code boundary may take the neighbouring code on one device)."""
    _, _, _, loaded = _export(family, tmp_path / "export")
    model = _denoiser(loaded).double()
    model.set_qdiff_kernel("reference")
    expected = _outputs(model, family, torch.device("cpu"))
    model.to(CUDA)
    for kernel in ("reference", *FAST):
        model.set_qdiff_kernel(kernel)
        for got, want in zip(_outputs(model, family, CUDA), expected):
            assert got.device.type == "cuda"
            _close(got, want, 1e-9, f"{family}: kernel {kernel} on CUDA against the CPU reference")


def test_distillation_on_cuda_lowers_the_loss_and_exports_what_it_trained(teacher, tmp_path):
    """The run's noise is drawn on the CPU (`trajectory_batch`), so only the device differs."""
    pipe = copy.deepcopy(teacher).to(CUDA)
    cfg = _config(tmp_path, "distill.steps=24", "distill.checkpoint_every=12", "quant.weight_bits=4",
                  "quant.act_bits=4", "distill.lr=2e-3")
    before = _held_out_loss(pipe, loop.build_student(pipe, cfg).model, "x0")
    student = loop.distill(pipe, cfg, cfg.run_dir)
    assert {p.device.type for p in student.parameters()} == {"cuda"}
    after = _held_out_loss(pipe, student, "x0")
    assert after < 0.9 * before
    export_pipeline(pipe, student, tmp_path / "export", cfg.quant)
    exported = qdiff.load_pipeline(tmp_path / "export").unet.to(CUDA)
    assert any(isinstance(m, IntLayer) for m in exported.modules())
    assert _held_out_loss(pipe, exported, "x0") == pytest.approx(after, rel=0.02)
