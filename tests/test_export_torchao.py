"""`export.format: torchao`: portable exports that stock diffusers loads without qdiff.

Tiny random SD, FLUX and Wan pipelines, each with a W4A8 dynamic-per-token student, are
exported with `export_pipeline(..., format="torchao")` and loaded by
`DiffusionPipeline.from_pretrained(path, dtype=torch.float32)` in one subprocess in
which `import qdiff` fails (no site processing: the editable install's finder is not on
the path, and the working directory is a temporary folder). Each denoiser's output there
equals the student's own output on the same inputs to float rounding (an activation on a
code edge may round to the neighbouring int8 code: a few 1e-4 relative at most). The students leave
convolutions unquantized for that comparison: torchao has no int8 convolution, so a
quantized convolution is exported as a float layer (tested on its own below).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

pytest.importorskip("torchao")

from qdiff.config import ConfigError, ExportConfig, QuantConfig  # noqa: E402
from qdiff.export import export_pipeline  # noqa: E402
from qdiff.export.torchao_format import RECORD_KEY, TorchaoExportError, torchao_model  # noqa: E402
from qdiff.quant import iter_quant_layers, quantize_  # noqa: E402
from tiny_families import tiny_flux, tiny_stable_diffusion, tiny_wan  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "quiet")

W4A8 = dict(weight_bits=4, act_bits=8, act_mode="dynamic_per_token")


def _inputs(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    if family == "sd":
        return {"sample": torch.randn(2, 4, 8, 8, generator=g),
                "encoder_hidden_states": torch.randn(2, 3, 16, generator=g),
                "timestep": torch.tensor([700.0, 300.0])}
    if family == "flux":
        return {"hidden_states": torch.randn(2, 16, 16, generator=g),
                "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
                "pooled_projections": torch.randn(2, 16, generator=g), "img_ids": torch.zeros(16, 3),
                "txt_ids": torch.zeros(5, 3), "guidance": torch.tensor([3.5, 3.5]),
                "timestep": torch.tensor([0.7, 0.3])}
    return {"hidden_states": torch.randn(2, 4, 2, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
            "timestep": torch.tensor([700.0, 300.0])}


FAMILIES = {"sd": (tiny_stable_diffusion, "unet"), "flux": (tiny_flux, "transformer"),
            "wan": (tiny_wan, "transformer")}


def _student(model: nn.Module, convolutions: bool = False, **quant) -> nn.Module:
    """A W4A8 dynamic-per-token student (clip ratio 1: not calibrated); convolutions
    unquantized unless `convolutions`."""
    convs = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Conv3d))]
    student = copy.deepcopy(model)
    quantize_(student, QuantConfig(**{**W4A8, **quant}, exclude=[] if convolutions else convs))
    return student.eval()


FRESH_PROCESS = textwrap.dedent("""
    import importlib.util, json, sys
    assert importlib.util.find_spec("qdiff") is None, "qdiff is importable"
    try:
        import qdiff
    except ImportError:
        pass
    else:
        raise AssertionError("import qdiff worked")
    import torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(1)
    for family, folder, component in json.loads(sys.argv[1]):
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
        model = getattr(pipe, component)
        with torch.no_grad():
            out = model(**load_file(f"{folder}.inputs.safetensors")).sample
        save_file({"out": out.contiguous()}, f"{folder}.out.safetensors")
        print(family, type(pipe).__name__, type(model).__module__.split(".")[0], type(model).__name__,
              type(model.get_submodule(json.loads(sys.argv[2])[family])).__name__)
    print("qdiff" in sys.modules)
""")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{family: (student, folder)}, all loaded by one fresh process; and its stdout lines."""
    root = tmp_path_factory.mktemp("torchao")
    done, probes = {}, {}
    for family, (build, component) in FAMILIES.items():
        pipe = build()
        student = _student(getattr(pipe, component))
        folder = export_pipeline(pipe, student, root / family, QuantConfig(**W4A8), format="torchao")
        save_file(_inputs(family), f"{folder}.inputs.safetensors")
        probes[family] = next(name for name, _ in iter_quant_layers(student))
        done[family] = (student, folder, component)
    jobs = json.dumps([[family, str(folder), component] for family, (_, folder, component) in done.items()])
    return done, _without_qdiff(FRESH_PROCESS, root, jobs, json.dumps(probes))


def _without_qdiff(script: str, cwd, *args: str) -> list[str]:
    """Run `script` where qdiff cannot be imported: `-S` skips site processing, so the
    editable install's path hook never runs; site-packages itself comes from PYTHONPATH,
    and the working directory holds no qdiff. Returns its stdout lines."""
    site = sysconfig.get_paths()["purelib"]
    result = subprocess.run([sys.executable, "-S", "-c", script, *args], cwd=cwd,
                            env={"PYTHONPATH": site, "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("\n")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stock_diffusers_loads_the_export_without_qdiff(exports, family):
    done, lines = exports
    student, folder, component = done[family]
    line = next(line.split() for line in lines if line.startswith(family + " "))
    assert line[2:] == ["diffusers", type(student).__name__, "Linear"]
    assert lines[-2] == "False"  # qdiff never entered the fresh process
    index = json.loads((folder / "model_index.json").read_text())
    assert index[component] == ["diffusers", type(student).__name__]
    config = json.loads((folder / component / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    quant_type = config["quantization_config"]["quant_type"]["default"]
    assert quant_type["_type"] == "Int8DynamicActivationInt8WeightConfig"
    assert sorted(config[RECORD_KEY]["int8_layers"]) == sorted(name for name, _ in iter_quant_layers(student))
    assert (folder / "qdiff_manifest.json").is_file()
    with torch.no_grad():
        expected = student(**_inputs(family)).sample
    out = load_file(f"{folder}.out.safetensors")["out"]
    # float rounding: qdiff's fake quantizer and torchao compute an activation's code in
    # different float orders, so a value on a code edge can land one int8 code apart
    error = (out - expected).abs()
    assert float(error.mean()) <= 1e-3 * float(expected.abs().mean())
    assert float(error.max()) <= 1e-2 * float(expected.abs().max())


def test_weights_are_the_students_codes(exports):
    """The Int8Tensor holds the student's codes, centred, and its step sizes: it dequantizes
    to the student's Q_w (to float rounding: torchao multiplies in another order)."""
    from diffusers import FluxTransformer2DModel
    from torchao.quantization import Int8Tensor
    student, folder, _ = exports[0]["flux"]
    loaded = FluxTransformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32)
    for name, layer in iter_quant_layers(student):
        weight = loaded.get_submodule(name).weight
        assert isinstance(weight, Int8Tensor)
        assert int(weight.qdata.abs().max()) <= 15
        wq = layer.weight_quantizer
        codes = wq.codes(layer.adapted_weight()) - wq.zero_point.round().view(-1, 1)
        assert torch.equal(weight.qdata.to(codes.dtype), codes)
        assert torch.equal(weight.scale.flatten(), wq.scale.detach())
        torch.testing.assert_close(weight.dequantize(), layer.quantized_weight().detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("source", ["student", "qdiff export"])
def test_convolutions_stay_float_and_are_listed(source, tmp_path):
    from qdiff.export import quantized_class_for
    from qdiff.export.torchao_format import torchao_model_from_export
    pipe = tiny_stable_diffusion()
    student = _student(pipe.unet, convolutions=True)
    if source == "student":
        model = torchao_model(student)
    else:
        model = torchao_model_from_export(quantized_class_for(student).from_student(student, {}))
    convs = [name for name, layer in iter_quant_layers(student) if not isinstance(layer.base_layer, nn.Linear)]
    assert convs and sorted(model.config.quantization_config["modules_to_not_convert"]) == sorted(convs)
    assert sorted(model.config[RECORD_KEY]["float_layers"]) == sorted(convs)
    layer = dict(iter_quant_layers(student))[convs[0]]
    torch.testing.assert_close(model.get_submodule(convs[0]).weight, layer.quantized_weight().detach(),
                               rtol=1e-6, atol=0)


def test_4bit_activations_are_refused_naming_the_layers(tmp_path):
    pipe = tiny_flux()
    student = _student(pipe.transformer, act_bits=4)
    with pytest.raises(TorchaoExportError, match=r"need qdiff's kernels: .*x_embedder \(4-bit activations\)"):
        export_pipeline(pipe, student, tmp_path / "export", QuantConfig(**W4A8), format="torchao")
    assert not any(tmp_path.iterdir())  # nothing written
    from qdiff.export import quantized_class_for
    from qdiff.export.torchao_format import torchao_model_from_export
    with pytest.raises(TorchaoExportError, match=r"x_embedder \(4-bit activations\)"):
        torchao_model_from_export(quantized_class_for(student).from_student(student, {}))


def test_export_format_config():
    assert ExportConfig().format == "qdiff" and ExportConfig(format="torchao").format == "torchao"
    with pytest.raises(ConfigError, match="export.format='onnx' is not allowed"):
        ExportConfig(format="onnx")


def test_missing_torchao_names_the_extra(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install qdiff-toolkit\[torchao\]"):
        ExportConfig(format="torchao")


TEACHER_UNET = textwrap.dedent("""
    import importlib.util, sys
    assert importlib.util.find_spec("qdiff") is None, "qdiff is importable"
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(1)
    unet = UNet2DConditionModel.from_pretrained(sys.argv[1], subfolder="unet", dtype=torch.float32)
    with torch.no_grad():
        out = unet(**load_file(sys.argv[2])).sample
    save_file({"out": out.contiguous()}, sys.argv[3])
    print(type(unet).__name__, type(unet.time_embedding.linear_1.weight).__name__, "qdiff" in sys.modules)
""")


def test_the_embedded_teachers_unet_loads_without_qdiff(teacher, tmp_path):
    """The embedded teacher's pipeline class is qdiff's, so stock diffusers loads its
    denoiser alone, from the export's `unet` subfolder."""
    student = _student(teacher.unet)
    folder = export_pipeline(teacher, student, tmp_path / "export", QuantConfig(**W4A8), format="torchao")
    g = torch.Generator().manual_seed(2)
    inputs = {"sample": torch.randn(2, 3, 8, 8, generator=g),
              "encoder_hidden_states": torch.randn(2, 1, 64, generator=g),
              "timestep": torch.tensor([800.0, 50.0])}
    save_file(inputs, tmp_path / "inputs.safetensors")
    lines = _without_qdiff(TEACHER_UNET, tmp_path, str(folder), str(tmp_path / "inputs.safetensors"),
                           str(tmp_path / "out.safetensors"))
    assert lines[0].split() == ["UNet2DConditionModel", "Int8Tensor", "False"]
    with torch.no_grad():
        expected = student(**inputs).sample
    error = (load_file(tmp_path / "out.safetensors")["out"] - expected).abs()
    assert float(error.mean()) <= 1e-3 * float(expected.abs().mean())
    assert float(error.max()) <= 1e-2 * float(expected.abs().max())


def test_an_existing_export_converts_to_the_same_torchao_model(exports, tmp_path):
    """`convert_export` rebuilds the torchao denoiser from a qdiff export's stored codes:
    the same tensors as exporting the student directly."""
    from diffusers import FluxTransformer2DModel

    from qdiff.export import convert_export

    student, direct, _ = exports[0]["flux"]
    qdiff_export = export_pipeline(tiny_flux(), student, tmp_path / "qdiff", QuantConfig(**W4A8))
    converted = convert_export(qdiff_export, tmp_path / "torchao")
    assert (converted / "qdiff_manifest.json").is_file()
    index = json.loads((converted / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    a, b = (FluxTransformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32)
            for folder in (direct, converted))
    assert list(a.state_dict()) == list(b.state_dict())
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if hasattr(x, "qdata"):
            assert torch.equal(x.qdata, y.qdata) and torch.equal(x.scale, y.scale)
        else:
            assert torch.equal(x, y), key
    with torch.no_grad():
        assert torch.equal(a(**_inputs("flux")).sample, b(**_inputs("flux")).sample)
    from qdiff.convert.__main__ import main  # the same from the command line
    main(["torchao", str(qdiff_export), str(tmp_path / "cli")])
    cli, api = (load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
                for folder in (tmp_path / "cli", converted))
    assert sorted(cli) == sorted(api) and all(torch.equal(cli[key], api[key]) for key in api)
    with pytest.raises(SystemExit):  # a taken output folder: one line, nothing written
        main(["torchao", str(qdiff_export), str(tmp_path / "cli")])


def test_a_linear_whose_codes_do_not_fit_int8_stays_float():
    pipe = tiny_flux()
    symmetric = torchao_model(_student(pipe.transformer, weight_bits=8, weight_symmetric=True))
    assert symmetric.config[RECORD_KEY]["float_layers"] == {}  # symmetric 8-bit codes are int8
    student = _student(pipe.transformer, weight_bits=8)
    layer = student.get_submodule("x_embedder")
    layer.weight_quantizer.zero_point.fill_(250)  # codes - 250 reach -250
    model = torchao_model(student)
    assert "beyond int8" in model.config[RECORD_KEY]["float_layers"]["x_embedder"]
    assert "x_embedder" in model.config.quantization_config["modules_to_not_convert"]
    assert type(model.x_embedder.weight) is nn.Parameter
    torch.testing.assert_close(model.x_embedder.weight, layer.quantized_weight().detach(), rtol=1e-6, atol=0)


def test_a_runs_export_follows_export_format(tmp_path):
    """`export.format: torchao` at the end of a run: the folder is the torchao form, loaded
    back with the stock class before it is renamed into place."""
    from qdiff.config import RunConfig
    from qdiff.families import family_for
    from qdiff.finetune import _export

    pipe = tiny_stable_diffusion()
    cfg = RunConfig(quant=QuantConfig(**W4A8),
                    export=ExportConfig(dir=str(tmp_path / "export"), format="torchao"))
    out = _export(family_for(pipe), _student(pipe.unet), cfg, tmp_path)
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
