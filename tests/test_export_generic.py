"""The generated integer classes: one shared suite over a table of diffusers denoiser classes.

`qdiff.export.models` writes no class per model: `Quantized<X>` is generated for any
diffusers model class X and found again by name (module `__getattr__`), which is how a
fresh process that ran only `import qdiff` loads any export. Also: exporting several
denoisers of one pipeline (Wan 2.2's two experts), and the errors of `export_pipeline`'s
component mapping and of `quantized_class_for`.
"""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from diffusers import (AutoencoderKL, CogVideoXTransformer3DModel, DiffusionPipeline, DiTTransformer2DModel,
                       FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       QwenImageTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel,
                       WanTransformer3DModel)
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import T5Config, T5EncoderModel

import qdiff
import qdiff.export.models as models
from qdiff.config import LoRAConfig, QuantConfig
from qdiff.export import QuantizedModelMixin, export_pipeline, quantized_class_for
from qdiff.quant import calibrating, iter_quant_layers, quantize_, set_timesteps
from tiny_families import tiny_clip_text, tiny_t5_tokenizer
from walk_cases import tiny_wan_two_experts

pytestmark = pytest.mark.usefixtures("one_thread", "quiet")


def _inputs(shapes: dict[str, tuple], gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: torch.randn(*shape, generator=gen) for name, shape in shapes.items()}


@dataclass
class Case:
    build: Callable[[], ModelMixin]
    inputs: Callable[[torch.Generator], dict]  # keyword arguments of one forward, but the timestep
    timesteps: tuple[float, ...]  # in the model's own units (Flux and Qwen-Image: 0..1)


def _flux():
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                  pooled_projection_dim=6, axes_dims_rope=(2, 2, 4))


CASES = {
    "UNet2DConditionModel": Case(
        lambda: UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=12, norm_num_groups=4),
        lambda g: _inputs({"sample": (2, 4, 8, 8), "encoder_hidden_states": (2, 3, 12)}, g), (900.0, 100.0)),
    "UNet2DModel": Case(
        lambda: UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                            layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
                            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D")),
        lambda g: _inputs({"sample": (2, 4, 8, 8)}, g), (900.0, 100.0)),
    "DiTTransformer2DModel": Case(
        lambda: DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                      norm_num_groups=4),
        lambda g: {**_inputs({"hidden_states": (2, 4, 8, 8)}, g), "class_labels": torch.tensor([1, 7])},
        (900.0, 100.0)),
    "WanTransformer3DModel": Case(
        lambda: WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                      in_channels=4, out_channels=4, text_dim=12, freq_dim=16, ffn_dim=16,
                                      num_layers=1, rope_max_seq_len=32),
        lambda g: _inputs({"hidden_states": (2, 4, 2, 8, 8), "encoder_hidden_states": (2, 5, 12)}, g),
        (900.0, 100.0)),
    "CogVideoXTransformer3DModel": Case(
        lambda: CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                            out_channels=4, time_embed_dim=8, text_embed_dim=12, num_layers=1,
                                            sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                            max_text_seq_length=5),
        lambda g: _inputs({"hidden_states": (2, 3, 4, 8, 8), "encoder_hidden_states": (2, 5, 12)}, g),
        (900.0, 100.0)),
    "FluxTransformer2DModel": Case(
        _flux,
        lambda g: {**_inputs({"hidden_states": (2, 16, 4), "encoder_hidden_states": (2, 5, 12),
                              "pooled_projections": (2, 6)}, g),
                   "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(5, 3)},
        (0.9, 0.1)),
    "SD3Transformer2DModel": Case(
        lambda: SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                      caption_projection_dim=16, pooled_projection_dim=6, out_channels=4,
                                      pos_embed_max_size=8),
        lambda g: _inputs({"hidden_states": (2, 4, 8, 8), "encoder_hidden_states": (2, 5, 12),
                           "pooled_projections": (2, 6)}, g),
        (900.0, 100.0)),
    "QwenImageTransformer2DModel": Case(
        lambda: QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                            axes_dims_rope=(2, 2, 4)),
        lambda g: {**_inputs({"hidden_states": (2, 16, 16), "encoder_hidden_states": (2, 5, 12)}, g),
                   "encoder_hidden_states_mask": torch.ones(2, 5), "img_shapes": [[(1, 4, 4)]] * 2},
        (0.9, 0.1)),
}


def _forward(model: nn.Module, case: Case, t: float, seed: int = 3) -> torch.Tensor:
    with torch.no_grad():
        return model(**case.inputs(torch.Generator().manual_seed(seed)),
                     timestep=torch.tensor([t, t])).sample


def _student(model: ModelMixin, case: Case) -> ModelMixin:
    """A quantized (default QuantConfig and LoRAConfig), calibrated copy of `model`."""
    student = copy.deepcopy(model)
    quantize_(student, QuantConfig(), LoRAConfig())
    set_timesteps(student, torch.tensor(case.timesteps))
    with torch.no_grad(), calibrating(student):
        for seed, t in enumerate(case.timesteps):
            _forward(student, case, t, seed)
    return student


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(case, base class, student, integer model, its folder, the model loaded back)."""
    case = CASES[request.param]
    torch.manual_seed(0)
    model = case.build().eval()
    student = _student(model, case)
    integer = quantized_class_for(student).from_student(student, {"recipe": "test"})
    folder = tmp_path_factory.mktemp(request.param)
    integer.save_pretrained(folder)
    return case, type(model), student, integer, folder, quantized_class_for(student).from_pretrained(folder)


def test_the_class_is_generated_once_and_found_by_its_name(exported):
    _, base, student, integer, folder, loaded = exported
    cls = quantized_class_for(student)
    name = "Quantized" + base.__name__
    assert cls.__name__ == cls.__qualname__ == name and cls.__module__ == "qdiff.export.models"
    assert cls.__bases__ == (QuantizedModelMixin, base) and base.__name__ in cls.__doc__
    assert getattr(models, name) is cls and quantized_class_for(base) is cls
    assert quantized_class_for(integer) is cls  # an integer model maps to its own class
    assert pickle.loads(pickle.dumps(cls)) is cls
    assert type(integer) is cls and type(loaded) is cls and isinstance(loaded, base)
    assert json.loads((folder / "config.json").read_text())["_class_name"] == name
    assert sorted(path.suffix for path in folder.iterdir()) == [".json", ".safetensors"]  # no pickle


def test_the_loaded_model_is_the_integer_model(exported):
    case, _, student, integer, _, loaded = exported
    qconfig = loaded.config["quantization_config"]
    assert qconfig["recipe"] == {"recipe": "test"}
    assert len(qconfig["layers"]) == len(dict(iter_quant_layers(student))) > 0
    for (key, a), (key2, b) in zip(integer.state_dict().items(), loaded.state_dict().items()):
        assert key == key2 and torch.equal(a, b)
    for t in case.timesteps:
        assert torch.equal(_forward(loaded, case, t), _forward(integer, case, t))
        expected = _forward(student, case, t)  # the student up to float rounding at code edges
        assert float((_forward(loaded, case, t) - expected).abs().mean()) < 0.1 * float(expected.abs().mean())


def test_dtype_and_torch_dtype_cast_the_float_parts_alike(exported):
    """diffusers 0.42 names the load dtype `dtype` (its pipeline loader still passes
    `torch_dtype`): either casts the float parts as `.to(dtype)` does (the integer layers'
    grids stay float32); the integer codes stay as saved."""
    _, _, student, integer, folder, _ = exported
    cls = quantized_class_for(student)
    a = cls.from_pretrained(folder, dtype=torch.bfloat16)
    b = cls.from_pretrained(folder, torch_dtype=torch.bfloat16)
    cast = copy.deepcopy(integer).to(torch.bfloat16).state_dict()
    floats = [key for key, value in integer.state_dict().items() if value.is_floating_point()]
    assert {cast[key].dtype for key in floats} == {torch.bfloat16, torch.float32}
    assert all(a.state_dict()[key].dtype == cast[key].dtype for key in floats)
    for key, value in integer.state_dict().items():
        assert torch.equal(a.state_dict()[key], b.state_dict()[key]), key
        if not value.is_floating_point():
            assert torch.equal(a.state_dict()[key], value), key


def _tiny_flux_pipeline() -> FluxPipeline:
    """Flux with tiny CLIP and T5 text encoders (the denoiser is what matters here)."""
    torch.manual_seed(0)
    text_encoder, tokenizer = tiny_clip_text()
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=12, d_kv=4, d_ff=16,
                                             num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=_flux().eval())


FRESH_PROCESS = textwrap.dedent("""
    import sys
    import torch
    import qdiff
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file
    torch.set_num_threads(1)
    assert "QuantizedFluxTransformer2DModel" not in vars(sys.modules["qdiff.export.models"])
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
    inputs = load_file(sys.argv[2])
    with torch.no_grad():
        out = pipe.transformer(**inputs).sample
    save_file({"out": out}, sys.argv[3])
    print(type(pipe).__name__, type(pipe.transformer).__name__, type(pipe.transformer).__module__)
""")


def test_a_fresh_process_loads_an_export_of_a_class_it_never_named(tmp_path):
    """`import qdiff` alone: diffusers asks qdiff.export.models for the class by name."""
    pipe = _tiny_flux_pipeline()
    case = CASES["FluxTransformer2DModel"]
    export_pipeline(pipe, _student(pipe.transformer, case), tmp_path / "export", QuantConfig())
    index = json.loads((tmp_path / "export" / "model_index.json").read_text())
    assert index["transformer"] == ["qdiff.export.models", "QuantizedFluxTransformer2DModel"]
    inputs = {**case.inputs(torch.Generator().manual_seed(4)), "timestep": torch.tensor([0.7, 0.7])}
    save_file(inputs, tmp_path / "inputs.safetensors")
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "export"),
                             str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["FluxPipeline", "QuantizedFluxTransformer2DModel", "qdiff.export.models"]
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "export")
    with torch.no_grad():
        expected = loaded.transformer(**inputs).sample
    assert torch.equal(load_file(tmp_path / "out.safetensors")["out"], expected)


def test_two_denoisers_export_and_load_back(tmp_path):
    pipe = tiny_wan_two_experts()
    wan = Case(None, lambda g: _inputs({"hidden_states": (2, 4, 2, 8, 8),
                                         "encoder_hidden_states": (2, 5, 12)}, g), (900.0, 100.0))
    students = {name: _student(getattr(pipe, name), wan) for name in ("transformer", "transformer_2")}
    out = export_pipeline(pipe, students, tmp_path / "export", QuantConfig())
    index = json.loads((out / "model_index.json").read_text())
    loaded = qdiff.load_pipeline(out)
    assert loaded.config.boundary_ratio == 0.8
    for name, student in students.items():
        assert index[name] == ["qdiff.export.models", "QuantizedWanTransformer3DModel"]
        model = getattr(loaded, name)
        assert type(model) is quantized_class_for(student)
        expected = quantized_class_for(student).from_student(student, {})
        assert torch.equal(_forward(model, wan, 500.0), _forward(expected, wan, 500.0))
    assert not torch.equal(_forward(loaded.transformer, wan, 500.0), _forward(loaded.transformer_2, wan, 500.0))


@pytest.fixture(scope="module")
def wan_pipe_and_student():
    pipe = tiny_wan_two_experts()
    wan = Case(None, lambda g: _inputs({"hidden_states": (2, 4, 2, 8, 8),
                                         "encoder_hidden_states": (2, 5, 12)}, g), (900.0,))
    return pipe, _student(pipe.transformer, wan)


@pytest.mark.parametrize("students, message", [
    (lambda s: {"transformer_3": s}, "The pipeline WanPipeline has no model component 'transformer_3' "
                                     "to export a student as; its model components are ["),
    (lambda s: {"vae": s}, "The pipeline WanPipeline's component 'vae' is a AutoencoderKLWan, but its "
                           "student is a WanTransformer3DModel."),
    (lambda s: {"transformer": nn.Linear(2, 2)}, "The pipeline WanPipeline's component 'transformer' is a "
                                                 "WanTransformer3DModel, but its student is a Linear."),
    (lambda s: {}, "export_pipeline takes a student model or a non-empty mapping"),
    (lambda s: nn.Linear(2, 2), "The pipeline WanPipeline has no ['unet', 'transformer', 'transformer_2'] "
                                "component of the student's class Linear."),
])
def test_export_pipeline_names_the_component_it_cannot_export(wan_pipe_and_student, tmp_path, students, message):
    pipe, student = wan_pipe_and_student
    with pytest.raises(ValueError) as error:
        export_pipeline(pipe, students(student), tmp_path / "export", QuantConfig())
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "export").exists()


class LocalModel(ModelMixin):
    """A ModelMixin that the diffusers package does not export: a loader could not find it."""


@pytest.mark.parametrize("student", [nn.Linear(2, 2), LocalModel()])
def test_a_student_that_is_not_a_diffusers_model_is_refused(student):
    with pytest.raises(ValueError, match=r"^Cannot export a .*(Linear|LocalModel): qdiff exports diffusers "
                                         r"model classes \(ModelMixin subclasses exported by the diffusers "
                                         r"package, e\.g\. UNet2DConditionModel, FluxTransformer2DModel\)\.$"):
        quantized_class_for(student)


def test_names_that_are_not_quantized_diffusers_models_are_missing():
    for name in ("QuantizedNoSuchModel", "Quantized", "QuantizedDDIMScheduler", "SchedulerMixin"):
        assert getattr(models, name, None) is None
    with pytest.raises(ImportError):
        from qdiff.export.models import QuantizedNoSuchModel  # noqa: F401
    from qdiff.export import QuantizedUNet2DConditionModel
    from qdiff.export.models import QuantizedUNet2DConditionModel as same
    assert same is QuantizedUNet2DConditionModel is quantized_class_for(UNet2DConditionModel)
