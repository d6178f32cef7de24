"""A run folder is a transaction: `python -m qdiff.finetune` never loses a previous run to a
run that fails to start, never shares its folder, never resumes into a different student,
and leaves neither litter nor duplicate log lines behind."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qdiff import finetune as finetune_module
from qdiff.config import load_config, save_config
from qdiff.distill import loop
from qdiff.distill.checkpoint import list_checkpoints
from qdiff.distill.run_dir import (
    LOCK_FILE,
    RESUMABLE_CHANGES,
    ResumeConfigError,
    acquire_lock,
    check_resume_config,
    open_run_folder,
    truncate_log,
)

from conftest import TINY_RUN, ctrl_c_at_training_step

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = [*TINY_RUN, "distill.checkpoint_every=4", "export.enabled=false"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tmp_path: Path, *overrides: str) -> list[str]:
    """A `python -m qdiff.finetune` command line for a tiny run of the embedded recipe."""
    return [str(REPO_ROOT / "configs" / "tiny-ldm-w4a4.yaml"), f"output_dir={tmp_path}",
            "name=run", f"model.path={REPO_ROOT / 'assets' / 'tiny-ldm-digits'}", *TINY,
            *overrides]


def _config(tmp_path: Path, *overrides: str):
    args = _args(tmp_path, *overrides)
    return load_config(args[0], args[1:])


def _fake_run(tmp_path: Path, *overrides: str) -> Path:
    """A previous run's files (a checkpoint, a log, samples, an export, the config)."""
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "step-0000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta.json").write_text(json.dumps({"step": 4}))
    (checkpoint / "student.safetensors").write_bytes(b"previous weights")
    (run_dir / "log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                               for s in range(1, 5)))
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / "previous.png").write_bytes(b"previous grid")
    (run_dir / "export").mkdir()
    (run_dir / "export" / "model_index.json").write_text("{}")
    save_config(_config(tmp_path, *overrides), run_dir / "config.yaml")
    return run_dir


def _hashes(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of the run but the lock, by path."""
    return {str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(run_dir.rglob("*")) if path.is_file() and path.name != LOCK_FILE}


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """Run `python -m qdiff.finetune argv` in-process; its exit status and stderr."""
    with pytest.raises(SystemExit) as stop:
        finetune_module.main(argv)
    return stop.value.code, capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted:"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- overwrite ------------------------------------------------------------------------------

def test_overwrite_with_a_bad_model_path_keeps_the_previous_run(tmp_path, capsys):
    run_dir = _fake_run(tmp_path)
    before = _hashes(run_dir)
    code, err = _main([*_args(tmp_path, "model.path=/no/such/pipeline"), "--overwrite"], capsys)
    assert code == 2
    assert _error_line(err).startswith("error: No pipeline folder at '/no/such/pipeline'")
    assert _hashes(run_dir) == before
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([LOCK_FILE, *{
        Path(name).parts[0] for name in before}])  # nothing set aside is left behind


def test_ctrl_c_during_calibration_of_an_overwrite_puts_the_previous_run_back(
        tmp_path, capsys, monkeypatch):
    run_dir = _fake_run(tmp_path)
    before = _hashes(run_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "calibrate", interrupted)
    args = [*_args(tmp_path), "--overwrite"]
    code, err = _main(args, capsys)
    assert code == 130
    assert _error_line(err) == (f"interrupted: the previous run in {run_dir} is as it was; "
                                f"start again with: python -m qdiff.finetune {' '.join(args)}")
    assert _hashes(run_dir) == before


def test_overwrite_deletes_the_previous_run_once_the_new_one_has_started(tmp_path, capsys):
    run_dir = _fake_run(tmp_path)
    finetune_module.finetune(_config(tmp_path, "distill.steps=4"), overwrite=True)
    assert not (run_dir / "samples" / "previous.png").exists()
    assert not (run_dir / "export").exists()  # export.enabled=false: the old one went too
    assert (run_dir / "checkpoints" / "step-0000004" / "student.safetensors").read_bytes() \
        != b"previous weights"
    assert [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4]
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [LOCK_FILE]


def test_an_overwrite_killed_during_set_up_is_put_back_by_the_next_run(tmp_path, caplog):
    run_dir = _fake_run(tmp_path)
    before = _hashes(run_dir)
    aside = run_dir / ".overwritten-0123abcd"  # what a SIGKILL during set-up leaves
    aside.mkdir()
    for entry in list(run_dir.iterdir()):
        if entry != aside:
            entry.rename(aside / entry.name)
    with caplog.at_level(logging.INFO, logger="qdiff.run_dir"), \
            open_run_folder(_config(tmp_path), resume=True):
        pass
    assert _hashes(run_dir) == before and not aside.exists()
    assert "put back the previous run" in caplog.text


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    run_dir = _fake_run(tmp_path)
    before = _hashes(run_dir)
    code, err = _main([*_args(tmp_path), "--overwrite", "--resume"], capsys)
    assert code == 2 and "--resume continues the run and --overwrite discards it" in err
    assert _hashes(run_dir) == before


def test_a_run_folder_with_checkpoints_needs_resume_or_overwrite(tmp_path, capsys):
    run_dir = _fake_run(tmp_path)
    before = _hashes(run_dir)
    code, err = _main(_args(tmp_path), capsys)
    assert code == 2
    assert _error_line(err) == (f"error: {run_dir} already holds checkpoints of a run. Pass "
                                f"--resume to continue it, --overwrite to start again, or "
                                f"name=<new name>.")
    assert _hashes(run_dir) == before


# --- lock -----------------------------------------------------------------------------------

def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock until it is killed."""
    code = ("import sys, time; from pathlib import Path; "
            "from qdiff.distill.run_dir import acquire_lock; "
            "acquire_lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_other_pid(tmp_path, capsys):
    run_dir = _fake_run(tmp_path)
    before = _hashes(run_dir)
    holder = _hold_lock(run_dir)
    try:
        code, err = _main([*_args(tmp_path), "--resume"], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert _error_line(err) == (f"error: {run_dir} is in use by another run (pid {holder.pid}): "
                                f"wait for it to finish, or start this one in another folder "
                                f"with name=<other name>.")
    assert _hashes(run_dir) == before
    acquire_lock(run_dir)  # the lock died with its process


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    acquire_lock(run_dir)
    with pytest.raises(Exception, match=rf"pid {__import__('os').getpid()}"):
        acquire_lock(run_dir)


# --- resume ---------------------------------------------------------------------------------

def test_resume_with_other_activation_bits_is_refused_and_keeps_the_config(tmp_path, capsys):
    run_dir = _fake_run(tmp_path)
    before = _hashes(run_dir)
    code, err = _main([*_args(tmp_path, "quant.act_bits=8", "seed=3"), "--resume"], capsys)
    assert code == 2
    assert _error_line(err) == (
        f"error: {run_dir} was trained with another config (quant.act_bits: 4 -> 8; seed: 0 -> 3): "
        f"resume with the run's values, start a new run (name=<new name> or --overwrite), or "
        f"pass --allow-config-change to resume anyway.")
    assert _hashes(run_dir) == before


def test_resume_may_train_longer_and_change_how_often_it_writes(tmp_path, caplog):
    run_dir = _fake_run(tmp_path)
    cfg = _config(tmp_path, "distill.steps=40", "distill.checkpoint_every=8", "eval.steps=5",
                  "export.enabled=true", "distill.divergence_factor=0")
    with caplog.at_level(logging.INFO, logger="qdiff.run_dir"):
        check_resume_config(run_dir / "config.yaml", cfg)
    assert "distill.steps: 1000 -> 40" in caplog.text and "eval.steps: 2 -> 5" in caplog.text
    assert "distill.steps" in RESUMABLE_CHANGES


def test_resume_may_not_change_the_steps_that_phi_decays_over(tmp_path):
    run_dir = _fake_run(tmp_path, "aux.enabled=true")
    cfg = _config(tmp_path, "aux.enabled=true", "distill.steps=40")
    with pytest.raises(ResumeConfigError, match=r"\(distill.steps: 1000 -> 40\)"):
        check_resume_config(run_dir / "config.yaml", cfg)


def test_allow_config_change_resumes_and_says_so(tmp_path, caplog):
    run_dir = _fake_run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="qdiff.run_dir"):
        check_resume_config(run_dir / "config.yaml", _config(tmp_path, "quant.act_bits=8"),
                            allow=True)
    assert "--allow-config-change: resuming with a changed student (quant.act_bits: 4 -> 8)" \
        in caplog.text


def test_a_resumed_run_logs_each_step_once(random_class_ldm_pipeline, tmp_path, monkeypatch):
    """Crash at step 7 after the checkpoint at 4: steps 5 and 6 are trained, and logged, again."""
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=run", *TINY, "distill.steps=8"])
    with ctrl_c_at_training_step(7), pytest.raises(KeyboardInterrupt):
        loop.distill(random_class_ldm_pipeline, cfg, cfg.run_dir)
    log = cfg.run_dir / "log.jsonl"
    with log.open("a") as torn:
        torn.write('{"step": 7, "lo')  # a kill in the middle of a line
    loop.distill(random_class_ldm_pipeline, cfg, cfg.run_dir, resume=True)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 9))


def test_truncating_the_log_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 7)))
    assert truncate_log(log, 4) == 2
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    assert list(tmp_path.iterdir()) == [log]  # the temporary file was renamed into place


# --- Ctrl-C ---------------------------------------------------------------------------------

def test_ctrl_c_exits_130_naming_the_checkpoint_and_the_resume_command(tmp_path, capsys,
                                                                         monkeypatch):
    args = _args(tmp_path, "distill.steps=8")
    with ctrl_c_at_training_step(6):
        code, err = _main(args, capsys)
    assert code == 130
    command = " ".join(["python -m qdiff.finetune", *args, "--resume"])
    assert _error_line(err) == (f"interrupted: the last checkpoint is "
                                f"{tmp_path / 'run' / 'checkpoints' / 'step-0000004'}; "
                                f"continue with: {command}")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000004"]


def test_a_real_sigint_exits_130_with_one_line_and_no_traceback(tmp_path):
    """The signal a terminal's Ctrl-C sends, to `python -m qdiff.finetune` itself."""
    args = _args(tmp_path, "distill.steps=400")
    # as from a terminal: a shell starts background jobs with SIGINT ignored, so restore it
    launch = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "sys.argv[0] = 'qdiff.finetune'; runpy.run_module('qdiff.finetune', run_name='__main__')")
    run = subprocess.Popen([sys.executable, "-c", launch, *args], cwd=REPO_ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not list_checkpoints(tmp_path / "run") and time.time() < deadline:
            time.sleep(0.2)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130
    last = list_checkpoints(tmp_path / "run")[-1]
    assert "Traceback" not in err
    assert err.rstrip("\n").splitlines()[-1] == (
        f"interrupted: the last checkpoint is {last}; continue with: python -m qdiff.finetune "
        f"{' '.join(args)} --resume")


# --- litter and unwritable folders ---------------------------------------------------------------

def test_the_next_run_removes_what_killed_runs_left_and_says_so(tmp_path, caplog):
    run_dir = finetune_module.finetune(_config(tmp_path, "distill.steps=4"))
    litter = [run_dir / ".export.partial-1a2b3c4d", run_dir / ".export.old-5e6f7a8b",
              run_dir / "checkpoints" / "step-0000008.tmp", run_dir / ".discarded-0badcafe"]
    for folder in litter:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half written")
    with caplog.at_level(logging.INFO, logger="qdiff.run_dir"):
        finetune_module.main([*_args(tmp_path, "distill.steps=8"), "--resume"])
    assert not any(folder.exists() for folder in litter)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-0000004", "step-0000008"]
    assert "removed what interrupted runs left" in caplog.text
    assert ".export.partial-1a2b3c4d" in caplog.text and "step-0000008.tmp" in caplog.text


def test_an_export_killed_between_its_renames_is_put_back(tmp_path):
    run_dir = _fake_run(tmp_path)
    before = _hashes(run_dir)
    (run_dir / "export").rename(run_dir / ".export.old-5e6f7a8b")  # the only copy
    with open_run_folder(_config(tmp_path), resume=True):
        pass
    assert _hashes(run_dir) == before


def test_an_unwritable_run_folder_is_one_line(tmp_path, capsys, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, err = _main(_args(tmp_path), capsys)
    assert code == 2
    assert _error_line(err) == (f"error: {tmp_path / 'run'}: the file system is read-only; "
                                f"choose a folder you can write to (or fix its permissions).")


def test_a_file_where_the_run_folder_should_be_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    code, err = _main(_args(tmp_path), capsys)
    assert code == 2
    assert _error_line(err) == (f"error: {tmp_path / 'run'} is a file, not a run folder: choose "
                                f"another name=<name> or output_dir=<folder>.")
