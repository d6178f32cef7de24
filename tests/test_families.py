"""Every family through one suite, on tiny random pipelines of the real architectures.

`FAMILY_CASES` is the family table: a tiny builder, the family's name and what its model
config needs (sizes, pipeline arguments, the recipe it is run with). Adding a family is one
file in `qdiff/families/` and one row here. For every row:

- the family is detected from the pipeline, and its 8-bit layers exist in every denoiser;
- the walk qdiff learns from is bit-identical to what `pipe(...)` samples for the same
  conditions and seeds, with the pipeline's configured scheduler;
- calibration keys the timestep tables by the timesteps the denoisers are called with;
- the recipe's code path (`python -m qdiff.finetune`: its dtype, packed student, 8-bit
  layers) distils a few steps with the student walking and with the teacher walking, the
  export passes its check, and a fresh process that only imports qdiff loads it with
  `DiffusionPipeline.from_pretrained` and samples exactly what the in-process load samples.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import qdiff
from qdiff.calibrate import by_component, trajectory_grid
from qdiff.config import ConfigError, ModelConfig, load_config
from qdiff.distill.loop import build_student
from qdiff.families import FAMILIES, family_for
from qdiff.finetune import finetune
from qdiff.quant import TemporalActQuantizer
from qdiff.walk import record_calls
from tiny_families import (FLUX2_TEXT_LAYERS, PROMPTS, tiny_class_wan, tiny_cogvideox, tiny_dit,
                           tiny_flux, tiny_flux2, tiny_image, tiny_ltx2, tiny_qwen_image,
                           tiny_stable_diffusion, tiny_stable_diffusion_3, tiny_stable_diffusion_xl,
                           tiny_wan22_i2v, tiny_wan22_ti2v)
from walk_cases import random_class_ldm, tiny_wan_two_experts

REPO = Path(__file__).resolve().parents[1]
STEPS = 2  # denoising steps of every trajectory here


@dataclass
class FamilyCase:
    build: Callable[[], DiffusionPipeline]
    family: str
    model: list[str] = field(default_factory=list)  # model.* overrides (sizes, pipeline_kwargs)
    recipe: Optional[str] = None  # configs/<recipe>: the code path it is run with
    images: bool = False  # image to video: a folder of first frames


VIDEO = "model.video_size=[5,16,16]"
FAMILY_CASES = {
    "class-ldm": FamilyCase(random_class_ldm, "class-ldm", recipe="tiny-ldm-w4a4.yaml"),
    "class-wan": FamilyCase(tiny_class_wan, "class-wan", recipe="tiny-wan-w4a4.yaml"),
    "sd": FamilyCase(tiny_stable_diffusion, "sd", recipe="sd15-w4a8.yaml"),
    "sdxl": FamilyCase(tiny_stable_diffusion_xl, "sdxl", recipe="sdxl-w4a4.yaml"),
    "sd3": FamilyCase(tiny_stable_diffusion_3, "sd3", ["model.image_size=[8,8]",
                      "model.pipeline_kwargs={max_sequence_length: 8}"], "sd3.5-large-w4a4.yaml"),
    "flux": FamilyCase(tiny_flux, "flux", ["model.image_size=[8,8]",
                       "model.pipeline_kwargs={max_sequence_length: 8}"], "flux1-dev-w4a4.yaml"),
    "flux2": FamilyCase(tiny_flux2, "flux2", [
        "model.image_size=[8,8]", "model.pipeline_kwargs={max_sequence_length: 40, "
        f"text_encoder_out_layers: {list(FLUX2_TEXT_LAYERS)}}}"]),
    "qwen-image": FamilyCase(tiny_qwen_image, "qwen-image", ["model.image_size=[16,16]"],
                             "qwen-image-w4a4.yaml"),
    "wan/two-experts": FamilyCase(tiny_wan_two_experts, "wan", [VIDEO], "wan2.2-t2v-a14b-w4a4.yaml"),
    "wan/ti2v": FamilyCase(tiny_wan22_ti2v, "wan", ["model.video_size=[5,32,32]"],
                           "wan2.2-ti2v-5b-w4a4.yaml"),
    "wan-i2v/two-experts": FamilyCase(tiny_wan22_i2v, "wan-i2v", [VIDEO], images=True),
    "dit": FamilyCase(tiny_dit, "dit", recipe="dit-xl2-w4a8.yaml"),
    "cogvideox": FamilyCase(tiny_cogvideox, "cogvideox", [VIDEO], "cogvideox-2b-w4a4.yaml"),
    "ltx2": FamilyCase(tiny_ltx2, "ltx2", ["model.video_size=[5,32,32]", "model.pipeline_kwargs="
                       "{max_sequence_length: 16, spatio_temporal_guidance_blocks: [0]}"]),
}

pytestmark = pytest.mark.usefixtures("one_thread", "quiet")


def _model_overrides(case: FamilyCase, root: Path) -> list[str]:
    overrides = [f"model.family={case.family}", *case.model]
    if FAMILIES[case.family].conditions == "prompts":
        prompts = root / "prompts.txt"
        prompts.write_text("# tiny prompts\n" + "\n".join(PROMPTS) + "\n")
        overrides.append(f"model.prompts={prompts}")
    if case.images:
        folder = root / "first-frames"
        folder.mkdir(exist_ok=True)
        for index in range(2):
            tiny_image().rotate(90 * index).save(folder / f"{index}.png")
        overrides.append(f"model.images={folder}")
    return overrides


def _family(name: str, root: Path):
    case = FAMILY_CASES[name]
    pipe = case.build()
    pipe.set_progress_bar_config(disable=True)
    model = load_config(None, _model_overrides(case, root)).model
    return family_for(pipe, model)


def _call(family, guidance: Optional[float] = None, output_type: str = "pt") -> dict:
    ids = torch.arange(2) % family.num_conditions
    generators = [torch.Generator().manual_seed(seed) for seed in (11, 12)]
    return family.call_kwargs(ids, generators, STEPS, guidance or family.default_guidance,
                              output_type=output_type)


@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_the_family_is_detected_and_its_eight_bit_layers_exist(name, tmp_path):
    family = _family(name, tmp_path)
    assert type(family_for(family.pipe)) is FAMILIES[FAMILY_CASES[name].family]
    for component in family.denoisers:
        names = [module for module, _ in family.denoiser(component).named_modules()]
        for pattern in family.eight_bit_layers:
            assert fnmatch.filter(names, pattern), (component, pattern)


@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_the_walk_qdiff_learns_from_is_bit_identical_to_what_pipe_samples(name, tmp_path):
    family = _family(name, tmp_path)
    expected = family.to_images(family.pipe(**_call(family)))
    output, calls = record_calls(family.pipe, _call(family))
    assert torch.equal(family.to_images(output), expected)
    assert {call.component for call in calls} == set(family.denoisers)
    assert len(calls) >= STEPS


@pytest.mark.parametrize("name", ["class-ldm", "flux", "wan/two-experts"])
def test_calibration_keys_the_tables_by_the_timesteps_the_denoiser_is_called_with(name, tmp_path):
    """FLUX passes its transformer t / 1000; Wan 2.2's experts share one grid."""
    family = _family(name, tmp_path)
    cfg = load_config(None, [*_model_overrides(FAMILY_CASES[name], tmp_path), "lora.rank=2",
                             "quant.calibration_samples=2", f"distill.trajectory_steps={STEPS}",
                             f"distill.guidance_scale={family.default_guidance}"])
    students = by_component(build_student(family, cfg).model, family)
    _, calls = record_calls(family.pipe, _call(family, output_type="latent"))
    called = {float(torch.as_tensor(call.timestep).reshape(-1).max()) for call in calls}
    grid = trajectory_grid(family, STEPS, family.default_guidance)
    assert sorted(called) == sorted(grid.tolist())
    for student in students.values():
        tables = [m for m in student.modules() if isinstance(m, TemporalActQuantizer)]
        assert tables
        for table in tables:
            torch.testing.assert_close(table.timesteps.cpu().sort().values,
                                       grid.to(table.timesteps.dtype).sort().values)


def _run_config(name: str, root: Path, walker: str):
    case = FAMILY_CASES[name]
    teacher = root / "teacher"
    if not teacher.exists():
        case.build().save_pretrained(teacher)
    recipe = REPO / "configs" / case.recipe if case.recipe else None
    return load_config(recipe, [
        f"model.path={teacher}", *_model_overrides(case, root), f"output_dir={root}",
        f"name={walker}", f"distill.walker={walker}", f"distill.trajectory_steps={STEPS}",
        f"distill.steps={2 * STEPS}", f"distill.checkpoint_every={STEPS}", "distill.batch_size=2",
        "quant.calibration_samples=2", "lora.rank=2", "aux.rank=2", "aux.phase_steps=1",
        "distill.log_every=1", "distill.sample_every=1000", "eval.steps=2",
        f"export.enabled={walker == 'student'}"])


FRESH_PROCESS = """
import json, sys
import torch
from PIL import Image
from safetensors.torch import save_file
import qdiff  # the only import that makes qdiff's integer models loadable
from diffusers import DiffusionPipeline
from qdiff.models.loading import QDIFF_PIPELINES
outputs = {}
for name, spec in json.loads(open(sys.argv[1]).read()).items():
    index = json.load(open(spec["folder"] + "/model_index.json"))
    absent = {k: None for k, v in index.items() if v == [None, None]}  # e.g. SD3 without T5
    # qdiff's own two pipeline classes are not in diffusers; every other family's is
    cls = QDIFF_PIPELINES.get(index["_class_name"], DiffusionPipeline)
    pipe = cls.from_pretrained(spec["folder"], **absent)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(spec["kwargs"])
    if "image" in kwargs:
        kwargs["image"] = Image.open(kwargs["image"]).convert("RGB")
    kwargs["generator"] = [torch.Generator().manual_seed(seed) for seed in spec["seeds"]]
    output = pipe(**kwargs)[0]
    outputs[name] = torch.as_tensor(output if not isinstance(output, list) else torch.stack(output))
save_file({name: value.contiguous() for name, value in outputs.items()}, sys.argv[2])
"""


def _portable(kwargs: dict, images: list[str]) -> dict:
    """A call's arguments as JSON (the first frame by path, generators by seed): ids 0 and 1
    take the first image of the folder."""
    kwargs = {key: value for key, value in kwargs.items() if key != "generator"}
    if "image" in kwargs:
        kwargs["image"] = images[0]
    return kwargs


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """Every family distilled with either walker (the student's run exported), and one fresh
    process's samples of every export: {name: (family, trained students, export, kwargs)}."""
    runs, spec = {}, {}
    for name in FAMILY_CASES:
        root = tmp_path_factory.mktemp(name.replace("/", "-"))
        for walker in ("teacher", "student"):
            cfg = _run_config(name, root, walker)
            run_dir = finetune(cfg)
        family = family_for(qdiff.load_pipeline(cfg.model.path), cfg.model)
        kwargs = _call(family, cfg.distill.guidance_scale, output_type="pt")
        images = sorted(str(p) for p in (root / "first-frames").glob("*.png"))
        runs[name] = (family, run_dir, kwargs, cfg)
        spec[name] = {"folder": str(run_dir / "export"), "kwargs": _portable(kwargs, images),
                      "seeds": [11, 12]}
    root = tmp_path_factory.mktemp("fresh")
    (root / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(root / "spec.json"),
                             str(root / "outputs.safetensors")], capture_output=True, text=True,
                            timeout=600, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                              "PATH": "/usr/bin:/bin"}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs, load_file(root / "outputs.safetensors")


@pytest.mark.parametrize("name", list(FAMILY_CASES))
def test_a_family_distils_with_either_walker_and_its_export_loads_in_a_fresh_process(
        name, distilled):
    runs, fresh = distilled
    family, run_dir, kwargs, cfg = runs[name]
    for walker in ("teacher", "student"):
        log = [json.loads(line) for line in (run_dir.parent / walker / "log.jsonl").open()]
        assert [record["step"] for record in log] == list(range(1, 2 * STEPS + 1))
        assert all(torch.isfinite(torch.tensor(record["loss"])) for record in log)
    exported = qdiff.load_pipeline(run_dir / "export")
    exported.set_progress_bar_config(disable=True)
    for component in family.denoisers:
        assert type(getattr(exported, component)).__name__.startswith("Quantized")
    in_process = torch.as_tensor(exported(**{**kwargs, "generator": [
        torch.Generator().manual_seed(seed) for seed in (11, 12)]})[0])
    assert torch.equal(fresh[name], in_process.to(fresh[name].dtype))


def test_a_family_that_does_not_fit_the_pipeline_is_refused_by_name(tmp_path):
    dit = tiny_dit()
    with pytest.raises(ConfigError, match="model.family='sd' does not fit the pipeline, a DiTPipeline"):
        family_for(dit, ModelConfig(family="sd", prompts=str(tmp_path / "p.txt")))
    with pytest.raises(ConfigError, match="model.family='nope' is not allowed"):
        ModelConfig(family="nope")
    with pytest.raises(ConfigError, match="set model.prompts"):
        family_for(tiny_stable_diffusion()).num_conditions
    with pytest.raises(ConfigError, match="distill.eta=0.5, but DiTPipeline samples deterministically"):
        family_for(dit).call_kwargs(torch.arange(1), None, 2, 4.0, eta=0.5)


def test_model_scheduler_picks_the_scheduler_the_walk_distils_on(tmp_path):
    """A recipe may distil on another scheduler than the pipeline ships (from its config)."""
    family = _family("sd", tmp_path)
    cfg = load_config(None, [*_model_overrides(FAMILY_CASES["sd"], tmp_path),
                             "model.scheduler=UniPCMultistepScheduler", "lora.rank=2",
                             "quant.calibration_samples=2", f"distill.trajectory_steps={STEPS}"])
    shipped = type(family.pipe.scheduler).__name__
    build_student(family, cfg)
    assert shipped != "UniPCMultistepScheduler"
    assert type(family.pipe.scheduler).__name__ == "UniPCMultistepScheduler"
    with pytest.raises(ConfigError, match="model.scheduler='UniPCMultistepSchedular' is not a "
                                          "diffusers scheduler class. Did you mean "
                                          "'UniPCMultistepScheduler'"):
        ModelConfig(scheduler="UniPCMultistepSchedular")


def test_each_expert_gets_a_student_trained_on_the_steps_it_serves(distilled):
    """Wan 2.2's two experts: both students' LoRA moved from its zero start, and each
    expert's denoiser calls sit on its side of the pipeline's boundary."""
    runs, _ = distilled
    family, run_dir, _, _ = runs["wan/two-experts"]
    checkpoint = sorted((run_dir / "checkpoints").iterdir())[-1]
    state = load_file(checkpoint / "student.safetensors")
    for component in ("transformer", "transformer_2"):
        lora_b = [value for key, value in state.items()
                  if key.startswith(f"{component}.") and key.endswith("lora_B")]
        assert lora_b and any(value.abs().sum() > 0 for value in lora_b), component
    _, calls = record_calls(family.pipe, _call(family, output_type="latent"))
    boundary = family.pipe.config.boundary_ratio * family.pipe.scheduler.config.num_train_timesteps
    for call in calls:
        high_noise = float(call.timestep.reshape(-1)[0]) >= boundary
        assert call.component == ("transformer" if high_noise else "transformer_2")
