"""Damaged checkpoints: never loaded as numbers, a resume falls back to the newest good one
and says so, and nothing good is pruned in favour of a damaged one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from damage import cut, flip_float_exponent
from safetensors.torch import load_file

from qdiff.checksums import sha256_file
from qdiff.config import load_config
from qdiff.distill import loop
from qdiff.distill.checkpoint import (
    CheckpointError,
    _trainable_state,
    checkpoint_problem,
    list_checkpoints,
    load_trained_student,
)
from qdiff.errors import QdiffError

from conftest import TINY_RUN, ctrl_c_at_training_step

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [*TINY_RUN, "export.enabled=false", "distill.walker=teacher", "distill.checkpoint_every=2"]
STEP_SIZE = "conv_in.act_quantizer.scale"


def _config(root: Path, *overrides: str):
    return load_config(None, [f"output_dir={root}", "name=run", *TINY, *overrides])


@pytest.fixture(scope="module")
def pipe():
    from qdiff.models.class_embedder import ClassEmbedder
    from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline
    from qdiff.models.zoo.train_autoencoder import build_vq_f4
    from qdiff.models.zoo.train_denoiser import (
        CONTEXT_DIM,
        build_class_unet,
        build_ddim_scheduler,
    )

    torch.manual_seed(0)
    return ClassConditionalLDMPipeline(
        unet=build_class_unet().eval(), class_embedder=ClassEmbedder(10, CONTEXT_DIM).eval(),
        vae=build_vq_f4().eval(), scheduler=build_ddim_scheduler())


@pytest.fixture(scope="module")
def finished(pipe, tmp_path_factory, one_thread):
    """A 4-step run with checkpoints at steps 2 and 4, and the weights it ended with."""
    cfg = _config(tmp_path_factory.mktemp("finished"), "distill.steps=4")
    return cfg.run_dir, _trainable_state(loop.distill(pipe, cfg, cfg.run_dir))


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run to damage, and its config."""
    shutil.copytree(finished[0], tmp_path / "run")
    return _config(tmp_path, "distill.steps=4")


def _assert_same_weights(student: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = _trainable_state(student)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def _latest(cfg) -> Path:
    return cfg.run_dir / "checkpoints" / "step-0000004"


def _rewrite_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, **changes}))


DAMAGES = {
    "flipped bit": (lambda folder: flip_float_exponent(folder / "student.safetensors", STEP_SIZE),
                    "student.safetensors checksum mismatch"),
    "cut short": (lambda folder: cut(folder / "optimizer.safetensors"),
                  "optimizer.safetensors size 1030120 bytes, 2060240 written"),
    "file deleted": (lambda folder: (folder / "optimizer.json").unlink(), "optimizer.json missing"),
    "meta.json cut": (lambda folder: cut(folder / "meta.json"), "meta.json is damaged (JSONDecodeError)"),
    "meta.json step changed": (lambda folder: _rewrite_meta(folder, step=6),
                               "meta.json is damaged (step 6 in folder step-0000004)"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_each_kind_of_damage_is_named(run, damage):
    inflict, reason = DAMAGES[damage]
    inflict(_latest(run))
    assert checkpoint_problem(_latest(run)) == reason
    assert checkpoint_problem(_latest(run).with_name("step-0000002")) is None


@pytest.mark.parametrize("damage", ["flipped bit", "cut short"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_and_says_so(
        pipe, finished, run, caplog, damage):
    inflict, reason = DAMAGES[damage]
    inflict(_latest(run))
    with caplog.at_level(logging.INFO, logger="qdiff.distill"):
        student = loop.distill(pipe, run, run.run_dir, resume=True)
    bad = _latest(run)
    assert (f"{bad}: {reason}; resuming from step-0000002 instead (the damaged one is kept as "
            f"step-0000004.damaged)") in caplog.messages
    assert f"resumed from {bad.with_name('step-0000002')} (step 2)" in caplog.messages
    # steps 3 and 4 trained again: the weights of the run that was never damaged
    _assert_same_weights(student, finished[1])
    assert [p.name for p in list_checkpoints(run.run_dir)] == ["step-0000002", "step-0000004"]
    assert bad.with_name("step-0000004.damaged").is_dir()


def test_a_flipped_bit_is_the_reported_step_size_blow_up_and_is_never_loaded(pipe, run):
    path = _latest(run) / "student.safetensors"
    before = load_file(path)[STEP_SIZE][0].item()
    flip_float_exponent(path, STEP_SIZE)
    after = load_file(path)[STEP_SIZE][0].item()
    assert max(after / before, before / after) == pytest.approx(2.0 ** 128, rel=1e-6)
    student = loop.build_student(pipe, run, calibrated=False).model
    message = (f"{_latest(run)}: student.safetensors checksum mismatch; the checkpoint is damaged. "
               f"Use another checkpoint of the run (or retrain).")
    with pytest.raises(CheckpointError) as error:
        load_trained_student(_latest(run), student)
    assert str(error.value) == message and isinstance(error.value, QdiffError)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        loop.student_at(pipe, run, _latest(run))


def test_the_save_after_a_fallback_keeps_the_good_checkpoint(pipe, run, monkeypatch):
    """Saves at 3 (then a crash): the two kept are 2 and 3, not 3 and the damaged 4."""
    flip_float_exponent(_latest(run) / "student.safetensors", STEP_SIZE)
    good = run.run_dir / "checkpoints" / "step-0000002"
    good_hashes = {f.name: sha256_file(f) for f in good.iterdir()}
    with ctrl_c_at_training_step(2), pytest.raises(KeyboardInterrupt):
        loop.distill(pipe, _config(run.run_dir.parent, "distill.steps=4",
                                   "distill.checkpoint_every=3"), run.run_dir, resume=True)
    assert [p.name for p in list_checkpoints(run.run_dir)] == ["step-0000002", "step-0000003"]
    assert {f.name: sha256_file(f) for f in good.iterdir()} == good_hashes


def test_no_good_checkpoint_left_stops_with_one_line_naming_each(pipe, run):
    flip_float_exponent(_latest(run) / "student.safetensors", STEP_SIZE)
    cut(run.run_dir / "checkpoints" / "step-0000002" / "student.safetensors")
    expected = (f"No usable checkpoint in {run.run_dir / 'checkpoints'} (step-0000004: "
                f"student.safetensors checksum mismatch; step-0000002: student.safetensors size "
                f"596306 bytes, 1192612 written); start the run again with --overwrite.")
    with pytest.raises(CheckpointError) as error:
        loop.distill(pipe, run, run.run_dir, resume=True)
    assert str(error.value) == expected and "\n" not in expected
    assert [p.name for p in list_checkpoints(run.run_dir)] == ["step-0000002", "step-0000004"]


def test_a_checkpoint_written_before_checksums_resumes_with_a_warning(pipe, finished, run, caplog):
    for folder in list_checkpoints(run.run_dir):
        meta = json.loads((folder / "meta.json").read_text())
        del meta["files"]
        (folder / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="qdiff.distill"):
        student = loop.distill(pipe, run, run.run_dir, resume=True)
    assert (f"{_latest(run)} was written without checksums (by an older qdiff) and cannot be "
            f"checked; loading it as it is") in caplog.messages
    assert f"resumed from {_latest(run)} (step 4)" in caplog.messages
    _assert_same_weights(student, finished[1])


def test_every_file_of_a_checkpoint_is_recorded_in_meta_json(run):
    meta = json.loads((_latest(run) / "meta.json").read_text())
    assert meta["step"] == 4
    assert sorted(meta["files"]) == ["optimizer.json", "optimizer.safetensors", "student.safetensors"]
    for name, entry in meta["files"].items():
        path = _latest(run) / name
        assert entry == {"size": path.stat().st_size, "sha256": sha256_file(path)}
