"""`python -m qdiff.sample` and `python -m qdiff.eval` for every family, end to end on tiny
random pipelines: a text-to-image family (Stable Diffusion) and a text-to-video family (Wan,
scored per frame), with a stand-in feature network."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from qdiff import sample
from qdiff.config import load_config, save_config
from qdiff.eval import cli
from qdiff.eval.digits_features import DigitsFeatureNet
from qdiff.eval.sampling import SamplingSettings, family_of, generate_samples, settings_for
from tiny_families import PROMPTS, tiny_stable_diffusion, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread", "quiet")
TEACHER = "assets/tiny-ldm-digits"

# family: (build, --size, tile (height, width) of one sample, frames per sample)
FAMILIES = {"sd": (tiny_stable_diffusion, None, (8, 8), 1),
            "wan": (tiny_wan, "5,16,16", (16, 5 * 16), 5)}


def _size(name: str) -> list[str]:
    size = FAMILIES[name][1]
    return ["--size", size] if size else []


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# two of the test prompts\n" + "\n".join(PROMPTS[:2]) + "\n\n")
    return path


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A stand-in feature network: a random digits-style net (no weights to download)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("features") / "net"
    DigitsFeatureNet(widths=(4, 8), spatial_block=0, spatial_channels=2).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def teacher(request, tmp_path_factory):
    """(family name, saved teacher folder)."""
    folder = tmp_path_factory.mktemp(request.param) / "teacher"
    FAMILIES[request.param][0]().save_pretrained(folder)
    return request.param, folder


def _student_run(name, teacher_folder, prompts, root):
    """A run folder whose export is the teacher with nudged weights, and whose config names
    the teacher, the prompt file and the sample size (what `teacher_of` reads)."""
    import qdiff

    pipe = qdiff.load_pipeline(teacher_folder)
    denoiser = pipe.unet if name == "sd" else pipe.transformer
    with torch.no_grad():
        for parameter in denoiser.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    pipe.save_pretrained(root / "export")
    overrides = [f"model.path={teacher_folder}", f"model.prompts={prompts}"]
    if FAMILIES[name][1]:
        overrides.append(f"model.video_size=[{FAMILIES[name][1]}]")
    save_config(load_config(None, overrides), root / "config.yaml")
    return root / "export"


def test_sample_writes_a_row_per_prompt_and_a_videos_frames_side_by_side(teacher, prompts, tmp_path):
    name, folder = teacher
    out = tmp_path / "grid.png"
    sample.main(["--pipeline", str(folder), "--prompts", str(prompts), "--per-class", "2",
                 "--steps", "2", "--batch-size", "3", "--out", str(out), *_size(name)])
    height, width = FAMILIES[name][2]
    # torchvision's grid: 1-pixel padding around and between tiles; 2 prompts x 2 samples
    assert Image.open(out).size == (2 * (width + 1) + 1, 2 * (height + 1) + 1)


def test_a_sample_does_not_depend_on_its_batch(teacher, prompts):
    name, folder = teacher
    import qdiff

    size = tuple(int(part) for part in FAMILIES[name][1].split(",")) if FAMILIES[name][1] else None
    family = family_of(qdiff.load_pipeline(folder), str(prompts), size)
    settings = settings_for(family, SamplingSettings(num_samples=2, steps=2, batch_size=1))
    one = generate_samples(family, settings)
    two = generate_samples(family, settings.__class__(**{**settings.__dict__, "batch_size": 2}))
    assert one.frames == two.frames == FAMILIES[name][3]
    assert len(one.images) == 2 * one.frames and one.conditions == "prompts"
    np.testing.assert_array_equal(one.images, two.images)
    np.testing.assert_array_equal(one.labels, np.repeat([0, 1], one.frames))


def test_eval_compares_an_export_with_its_teacher_on_the_same_prompts_and_seeds(
        teacher, prompts, features, tmp_path, caplog):
    name, folder = teacher
    export = _student_run(name, folder, prompts, tmp_path / "run")
    out = tmp_path / "eval" / "results.json"
    argv = ["--pipeline", str(export), "--features", str(features), "--metric", "fid,accuracy",
            "--num-samples", "4", "--batch-size", "2", "--steps", "2", "--out", str(out)]
    with caplog.at_level(logging.INFO, logger="qdiff.eval"):
        cli.main(argv)  # prompts and size from the run's config, the teacher from model.path
    record = json.loads(out.read_text())
    frames = FAMILIES[name][3]
    assert record["reference"] == f"{folder} (same seeds)"
    assert record["num_evaluated"] == 4 and record["frames_per_sample"] == frames
    assert record["scored"] == ("per frame" if frames > 1 else "per image")
    assert record["conditions"] == str(prompts)
    assert set(record["results"]) == {"fid"} and record["results"]["fid"] > 0
    assert ("skipping accuracy: it needs class labels, and the pipeline is conditioned on "
            "prompts") in caplog.messages
    grid = Image.open(out.with_name("samples.png"))
    rows = 4 if frames > 1 else 1  # a row per video (frames left to right), or ten images
    assert grid.size[1] == rows * (FAMILIES[name][2][0] + 1) + 1
    # the teacher against itself, same seeds: a perfect pair, from the cache already drawn
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qdiff.eval"):
        cli.main(["--pipeline", str(folder), "--teacher", str(folder), "--prompts",
                  str(prompts), *_size(name), *argv[2:]])
    assert abs(json.loads(out.read_text())["results"]["fid"]) < 1e-3
    assert sum("reusing 4 samples" in message for message in caplog.messages) == 2


ERRORS = [
    (sample.main, "sd", [], "--pipeline {sd} is a sd pipeline, conditioned on prompts: give "
                           "--prompts FILE (one prompt per line)."),
    (cli.main, "sd", [], "--pipeline {sd} is a sd pipeline, conditioned on prompts: give "
                        "--prompts FILE (one prompt per line)."),
    (sample.main, "sd", ["--prompts", "{empty}"], "--prompts {empty} holds no prompts; write "
                                                 "one prompt per line (a line starting with "
                                                 "'#' is a comment)."),
    (cli.main, "sd", ["--prompts", "{empty}"], "--prompts {empty} holds no prompts; write one "
                                              "prompt per line (a line starting with '#' is a "
                                              "comment)."),
    (sample.main, "sd", ["--prompts", "{tmp}/none.txt"], "--prompts {tmp}/none.txt: no such "
                                                        "file; give a text file with one prompt "
                                                        "per line."),
    (sample.main, "sd", ["--prompts", "{prompts}", "--classes", "1"],
     "--classes: --pipeline {sd} is a sd pipeline, conditioned on prompts, not class ids; give "
     "--prompts FILE instead."),
    (sample.main, "ldm", ["--classes", "3,10,12"], "--classes 10,12: the pipeline {ldm} has "
                                                  "classes 0..9; give classes in that range."),
    (sample.main, "ldm", ["--prompts", "{prompts}"], "--prompts {prompts}: --pipeline {ldm} is a "
                                                    "class-ldm pipeline, conditioned on class "
                                                    "ids; leave --prompts out (or give "
                                                    "--classes)."),
    (sample.main, "ldm", ["--size", "16"], "argument --size: takes HEIGHT,WIDTH (images) or "
                                          "FRAMES,HEIGHT,WIDTH (videos), each 1 or more, e.g. "
                                          "5,16,16; got '16'"),
]


@pytest.mark.parametrize("main, pipeline, argv, message", ERRORS,
                         ids=[f"{m.__module__}-{p}-{' '.join(a)}" for m, p, a, _ in ERRORS])
def test_conditions_that_cannot_be_sampled_are_one_line_before_loading(
        main, pipeline, argv, message, prompts, tmp_path, capsys, monkeypatch):
    sd = tmp_path / "sd"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    fill = {"sd": str(sd), "ldm": TEACHER, "empty": str(tmp_path / "empty.txt"),
            "tmp": str(tmp_path), "prompts": str(prompts)}
    monkeypatch.setattr(sample, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("loaded"))
    out = tmp_path / ("grid.png" if main is sample.main else "results.json")
    with pytest.raises(SystemExit) as stop:
        main(["--pipeline", fill[pipeline], "--out", str(out), *[a.format(**fill) for a in argv]])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(message.format(**fill))
    assert not out.exists()
