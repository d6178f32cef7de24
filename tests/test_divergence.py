"""Divergence is a failure, not a result: a run whose loss runs away, or whose quantizer
tables stop being numbers, stops with one line naming the last good checkpoint and exports
nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from qdiff import finetune as finetune_module
from qdiff.config import ConfigError, load_config
from qdiff.distill import loop
from qdiff.distill.checkpoint import list_checkpoints
from qdiff.distill.divergence import (
    FIRST_STEP_KEY,
    TRAJECTORY_KEY,
    DivergenceError,
    DivergenceWatch,
)
from qdiff.quant import TemporalActQuantizer

from conftest import TINY_RUN, ctrl_c_at_training_step

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_RUN, "distill.checkpoint_every=4"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path: Path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path}", "name=run", *TINY,
                              "export.enabled=false", *overrides])


def test_a_run_at_lr_1e10_stops_without_export_and_names_no_checkpoint_good(tmp_path, capsys):
    """Its first update breaks the student: the first step of the next trajectory is
    >10x the untrained student's loss there, and the checkpoint at step 4 is no good."""
    argv = [str(REPO_ROOT / "configs" / "tiny-ldm-w4a4.yaml"), f"output_dir={tmp_path}",
            "name=run", f"model.path={REPO_ROOT / 'assets' / 'tiny-ldm-digits'}", *TINY,
            "distill.steps=16", "distill.lr=1e10"]  # export enabled
    with pytest.raises(SystemExit) as stop:
        finetune_module.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    line = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(line) == 1
    assert line[0].startswith("error: Stopped at step 4, nothing exported: the run diverged: the "
                              "loss at the trajectory's first denoising step is ")
    assert "(distill.divergence_factor=10). The last good checkpoint is none; start again " \
           "with a lower distill.lr (or act_lr) (--overwrite)" in line[0]
    assert not (tmp_path / "run" / "export").exists()
    assert not list((tmp_path / "run").glob(".export*"))
    # the checkpoint at step 4 holds the broken student: set aside, so --resume cannot take it
    assert list_checkpoints(tmp_path / "run") == []
    assert (tmp_path / "run" / "checkpoints" / "step-0000004.diverged" / "meta.json").is_file()


def test_the_references_survive_a_resume(random_class_ldm_pipeline, tmp_path, monkeypatch):
    """The checkpoints keep the run's references; a resumed run whose loss is 100x the run's
    start is stopped, though it is level with its own start."""
    cfg = _config(tmp_path, "distill.steps=12", "distill.walker=teacher")
    with ctrl_c_at_training_step(9), pytest.raises(KeyboardInterrupt):
        loop.distill(random_class_ldm_pipeline, cfg, cfg.run_dir)
    losses = [json.loads(line)["loss"] for line in (cfg.run_dir / "log.jsonl").read_text().splitlines()]
    meta = json.loads((cfg.run_dir / "checkpoints" / "step-0000008" / "meta.json").read_text())
    assert meta[FIRST_STEP_KEY] == losses[0]
    assert meta[TRAJECTORY_KEY] == pytest.approx(sum(losses[:4]) / 4)

    original = loop._optimizer_step

    def hundredfold(trainer):
        original(trainer)
        return 100 * meta[TRAJECTORY_KEY]

    monkeypatch.setattr(loop, "_optimizer_step", hundredfold)
    with pytest.raises(DivergenceError) as error:
        loop.distill(random_class_ldm_pipeline, cfg, cfg.run_dir, resume=True)
    assert f"the untrained student's {meta[FIRST_STEP_KEY]:.4g}" in str(error.value)
    # the checkpoint of step 8 holds the student whose loss failed the check
    assert f"checkpoint is {cfg.run_dir / 'checkpoints' / 'step-0000004'};" in str(error.value)


def test_a_table_that_is_no_longer_a_number_stops_the_run_before_its_checkpoint(
        random_class_ldm_pipeline, tmp_path, monkeypatch):
    cfg = _config(tmp_path, "distill.steps=8", "distill.log_every=4")
    original, calls = loop._optimizer_step, []

    def poison_after_step_six(trainer):
        result = original(trainer)
        calls.append(1)
        if len(calls) == 6:  # a table entry no step of the trajectory has used yet
            quantizer = next(m for m in trainer.model.modules()
                             if isinstance(m, TemporalActQuantizer))
            with torch.no_grad():
                quantizer.scale[-1] = math.inf
            broken.append(quantizer)
        return result

    broken: list = []
    monkeypatch.setattr(loop, "_optimizer_step", poison_after_step_six)
    with pytest.raises(DivergenceError) as error:
        loop.distill(random_class_ldm_pipeline, cfg, cfg.run_dir)
    message = str(error.value)
    assert message.startswith("Stopped at step 8, nothing exported: the run diverged: 1 "
                              "quantized layers have non-finite step sizes or tables (")
    assert f"checkpoint is {cfg.run_dir / 'checkpoints' / 'step-0000004'};" in message
    assert [path.name for path in list_checkpoints(cfg.run_dir)] == ["step-0000004"]


def test_a_healthy_run_stays_far_below_the_default_factor():
    """The loss of a healthy run falls from both references (synthetic: one trajectory's
    steps from 8 down to 1, each trajectory a little lower)."""
    watch = DivergenceWatch(10.0, 4)
    for step in range(40):
        assert watch.check(step, (8 - 2 * (step % 4)) * 0.99 ** (step // 4)) is None
    assert watch.first_trajectory == pytest.approx(5.0) and watch.first_step == 8.0


def test_a_loss_that_rises_tenfold_over_a_trajectory_is_divergence():
    watch = DivergenceWatch(10.0, 4)
    losses = [8, 6, 4, 2] + [8, 6, 4, 2] + [8, 100, 100]
    problems = [watch.check(step, loss) for step, loss in enumerate(losses)]
    assert problems[:-1] == [None] * 10
    assert problems[-1] == ("the mean loss of the last 4 steps is 52.5, 10.5x the first "
                            "trajectory's 5 (distill.divergence_factor=10)")


def test_a_zero_factor_never_stops_a_run_but_keeps_the_references():
    watch = DivergenceWatch(0.0, 2)
    assert all(watch.check(step, 10.0 ** step) is None for step in range(10))
    assert watch.meta() == {TRAJECTORY_KEY: 5.5, FIRST_STEP_KEY: 1.0}


@pytest.mark.parametrize("factor, reason", [
    ("1", "out of range; allowed: 0 \\(no check\\) or a finite factor above 1"),
    ("0.5", "out of range"), ("-1", "out of range"),
    ("nan", "is not a finite number"), ("inf", "is not a finite number")])
def test_a_divergence_factor_that_is_not_0_or_above_1_is_refused(factor, reason):
    with pytest.raises(ConfigError, match=rf"distill.divergence_factor={factor}.* {reason}"):
        load_config(None, [f"distill.divergence_factor={factor}"])
    assert load_config(None, ["distill.divergence_factor=0"]).distill.divergence_factor == 0
