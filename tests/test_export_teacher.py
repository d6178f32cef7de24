"""Export of the embedded teacher's W4A4 student (configs/tiny-ldm-w4a4.yaml): size, exactness,
and `qdiff.load_pipeline` in a fresh process."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import qdiff
from qdiff.calibrate import calibrate
from qdiff.config import load_config
from qdiff.export import QuantizedUNet2DConditionModel, export_pipeline, layer_mismatch, on_grid_reference
from qdiff.quant import iter_quant_layers, quantize_

from conftest import ASSETS, REPO_ROOT

SAMPLE = {"class_labels": [3, 8], "guidance_scale": 2.0, "num_inference_steps": 4}


pytestmark = pytest.mark.usefixtures("one_thread", "quiet")


@pytest.fixture(scope="module")
def w4a4(teacher, tmp_path_factory):
    """(student, loaded export, export folder): the recipe's W4A4, a few calibration
    trajectories, and a random non-zero LoRA standing in for training."""
    cfg = load_config(REPO_ROOT / "configs" / "tiny-ldm-w4a4.yaml")
    torch.manual_seed(0)
    student = copy.deepcopy(teacher.unet)
    quantize_(student, cfg.quant, cfg.lora, cfg.aux)
    for _, layer in iter_quant_layers(student):
        torch.nn.init.normal_(layer.lora_B, std=1e-3)
    calibrate(student, teacher, num_samples=2, steps=10, eta=1.0, guidance=2.0, batch_size=2)
    folder = export_pipeline(teacher, student, tmp_path_factory.mktemp("w4a4") / "export", cfg.quant)
    loaded = qdiff.load_pipeline(folder)
    loaded.set_progress_bar_config(disable=True)
    return student, loaded, folder


def _bytes(folder):
    return sum(path.stat().st_size for path in folder.iterdir())


def test_w4a4_denoiser_takes_at_most_a_fifth_of_its_float32_bytes(w4a4):
    _, _, folder = w4a4
    ratio = _bytes(folder / "unet") / _bytes(ASSETS / "tiny-ldm-digits" / "unet")
    assert ratio <= 0.2, ratio  # measured 0.165 (config.json with the layer map included)


def test_recipe_bits_are_recorded_per_layer(w4a4):
    _, loaded, _ = w4a4
    layers = loaded.unet.config["quantization_config"]["layers"]
    assert layers["conv_in"]["weight_bits"] == layers["conv_out"]["act_bits"] == 8
    assert layers["time_embedding.linear_1"]["weight_bits"] == 8
    assert layers["down_blocks.1.attentions.0.proj_in"]["weight_bits"] == 4
    assert layers["up_blocks.1.resnets.2.conv_shortcut"]["act_split"] == [64, 32]  # decoder, skip
    assert layers["up_blocks.1.resnets.2.conv1"]["act_split"] == []
    assert layers["mid_block.attentions.0.transformer_blocks.0.ff.net.2"]["input_rotation"] == "hadamard"
    assert layers["mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"]["input_rotation"] == "none"


@torch.no_grad()
def test_export_leaves_the_student_as_it_was(teacher, w4a4, tmp_path):
    student, _, _ = w4a4
    before = _guided(teacher, student, torch.float32)
    export_pipeline(teacher, student, tmp_path / "again", load_config().quant)
    assert all(not layer.merged and layer.lora_A is not None for _, layer in iter_quant_layers(student))
    for a, b in zip(before, _guided(teacher, student, torch.float32)):
        assert torch.equal(a, b)


def _guided(pipe, denoiser, dtype):
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 3, 8, 8, generator=gen).to(dtype)
    context = pipe.class_context(torch.tensor([0, 9]), 2.0).to(dtype)
    return [pipe.guided_noise(latents, torch.tensor(t), context, 2.0, denoiser=denoiser)
            for t in (981, 533, 20)]  # on, between and near the calibrated table's entries


@torch.no_grad()
def test_every_layer_reproduces_the_student_in_float32(teacher, w4a4):
    student, loaded, _ = w4a4
    errors = layer_mismatch(student, loaded.unet, lambda s: _guided(teacher, s, torch.float32))
    assert len(errors) == 201 and max(errors.values()) < 2e-6


@torch.no_grad()
def test_denoiser_output_equals_the_students_in_float64(teacher, w4a4):
    student, loaded, _ = w4a4
    expected = _guided(teacher, on_grid_reference(student), torch.float64)
    got = _guided(teacher, copy.deepcopy(loaded.unet).double(), torch.float64)
    for e, g in zip(expected, got):
        assert float((g - e).abs().max()) < 1e-10 * float(e.abs().max())


def test_images_from_the_same_seed_match_in_float64(teacher, w4a4):
    student, loaded, _ = w4a4
    pipes = [copy.deepcopy(teacher), copy.deepcopy(loaded)]
    pipes[0].unet = on_grid_reference(student)
    images = [pipe.to(torch.float64)(**SAMPLE, output_type="np",
                                     generator=torch.Generator().manual_seed(0)).images for pipe in pipes]
    assert np.abs(images[0] - images[1]).max() < 1e-9


FRESH_PROCESS = textwrap.dedent("""
    import sys
    import numpy as np, torch
    import qdiff
    torch.set_num_threads(1)
    pipe = qdiff.load_pipeline(sys.argv[1])
    pipe.set_progress_bar_config(disable=True)
    print(type(pipe).__name__, type(pipe.unet).__name__)
    images = pipe(class_labels=[3, 8], guidance_scale=2.0, num_inference_steps=4, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    np.save(sys.argv[2], images)
""")


def test_a_fresh_process_loads_the_export_and_generates_the_same_images(w4a4, tmp_path):
    _, loaded, folder = w4a4
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), str(tmp_path / "x.npy")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ClassConditionalLDMPipeline", QuantizedUNet2DConditionModel.__name__]
    expected = loaded(**SAMPLE, output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), expected, rtol=0, atol=1e-6)
