"""An export in bfloat16: the float parts follow the dtype, the integer layers stay integer,
and their tables and weight scales stay float32 (a bfloat16 timestep table would round
999 to 1000 and pick another entry). Every kernel then gives the bfloat16 reference path's
numbers, as in float32.

(The whole output is not compared with a float32 run: at 4-bit activations, rounding an
input to bfloat16 moves some values across a code boundary, and such flips compound over
the layers of a random tiny model.)
"""

from __future__ import annotations

import pytest
import torch

from qdiff.export import IntLayer
from qdiff.export.act_codes import TimestepActCodes
from test_export_families import CALLS, FAMILIES, _denoiser, _export

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_dtype_cast_leaves_the_timestep_table_float32():
    act = TimestepActCodes(bits=4, symmetric=False, table_size=2)
    act.timesteps.copy_(torch.tensor([999.0, 981.0]))
    act.to(torch.bfloat16)
    assert act.timesteps.dtype == torch.float32 and act.timesteps.tolist() == [999.0, 981.0]
    assert torch.tensor([999.0]).bfloat16().item() == 1000.0  # what the cast would have done


@pytest.mark.parametrize("family", ["class-ldm-w4a4", "sd-w4a8", "wan-w4a4-per-token"])
def test_a_bfloat16_export_keeps_integer_grids_float32_and_every_kernel_gives_its_reference(family, tmp_path):
    _, _, _, loaded = _export(family, tmp_path / "export")
    model = _denoiser(loaded).to(torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, IntLayer)]
    assert layers and all(m.weight_scale.dtype == torch.float32 for m in layers)
    assert all(buffer.dtype == torch.float32 for m in layers for buffer in m.act.buffers()
               if buffer.is_floating_point())
    assert all(m.bias is None or m.bias.dtype == torch.bfloat16 for m in layers)
    outputs = {}
    for kernel in ("reference", "auto", "onednn", "onednn-im2col", "int8", "float"):
        model.set_qdiff_kernel(kernel)
        with torch.no_grad():
            outputs[kernel] = CALLS[FAMILIES[family].call](model, torch.tensor(900.0),
                                                           torch.Generator().manual_seed(4), torch.bfloat16)
    expected = outputs.pop("reference")
    assert expected.dtype == torch.bfloat16
    for kernel, got in outputs.items():
        torch.testing.assert_close(got, expected, rtol=0, atol=2 ** -6 * float(expected.abs().max()),
                                   msg=lambda message: f"{kernel}: {message}")
