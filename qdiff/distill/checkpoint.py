"""Checkpoints of a distillation run: safetensors for tensors, JSON for the rest.

A checkpoint holds only what training changes: the student's trainable parameters and
its buffers (activation tables, packed codes), the optimizer state and, with
`distill.ema_decay`, the parameters' average (`qdiff.distill.ema`). The frozen base
weights come back from the teacher when the student is rebuilt. Each checkpoint is
written to `<name>.tmp` and renamed when complete, so a crash never leaves one that
looks finished; the two newest are kept.

`meta.json` is written last and records the size and SHA-256 of every other file of the
checkpoint (`qdiff.checksums`): a flipped bit or a cut file would otherwise load into
wrong numbers and train on. A resume takes the newest checkpoint that checks out: a
damaged newer one is named in a warning and set aside as `<name>.damaged` (kept for
inspection, never counted among the two kept nor loaded), so the next save cannot prune
the good one in its favour; with none left the resume stops and says to start again.
Loading one checkpoint for evaluation (`load_trained_student`) checks it the same way
and refuses it when damaged. Checkpoints written before checksums load with a warning
that they cannot be checked, so existing runs still resume.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qdiff.checksums import describe_files, first_problem, well_formed
from qdiff.config import ConfigError
from qdiff.distill.ema import EMA_FILE, ParameterEMA, averaged_parameters, copy_average
from qdiff.errors import QdiffError

KEEP_LAST = 2
META_FILE = "meta.json"
CHECKSUMS_KEY = "files"  # in meta.json: {file name: {"size", "sha256"}}
DAMAGED_SUFFIX = ".damaged"  # a resume found its files changed
DIVERGED_SUFFIX = ".diverged"  # written after the last step a divergence check passed
_REQUIRED = ("student.safetensors", "optimizer.safetensors", "optimizer.json")
_NAME = re.compile(r"^step-(\d{7,})$")

logger = logging.getLogger("qdiff.distill")


class CheckpointError(QdiffError):
    """A checkpoint is damaged (or none of a run's is usable); the message names it."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _trainable_state(student: nn.Module) -> dict[str, torch.Tensor]:
    params = dict(student.named_parameters())
    return {key: value.detach().contiguous() for key, value in student.state_dict().items()
            if key not in params or params[key].requires_grad}


def _optimizer_tensors_and_rest(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entries in state["state"].items():
        rest["state"][str(index)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.contiguous()
            else:
                rest["state"][str(index)][name] = value
    return tensors, rest


def _optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in rest["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, student: nn.Module,
                    optimizer: torch.optim.Optimizer, meta: dict,
                    ema: Optional[ParameterEMA] = None) -> Path:
    final = checkpoint_dir(run_dir) / f"step-{step:07d}"
    partial = final.with_name(final.name + ".tmp")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(_trainable_state(student), partial / "student.safetensors")
    tensors, rest = _optimizer_tensors_and_rest(optimizer.state_dict())
    save_file(tensors, partial / "optimizer.safetensors")
    (partial / "optimizer.json").write_text(json.dumps(rest))
    if ema is not None:
        save_file(ema.state_dict(), partial / EMA_FILE)
    files = describe_files(partial, [path.name for path in partial.iterdir()])
    (partial / META_FILE).write_text(json.dumps({"step": step, **meta, CHECKSUMS_KEY: files},
                                                indent=2))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in list_checkpoints(run_dir)[:-KEEP_LAST]:  # only once the new one is complete
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is a crash, a `.damaged` one was
    set aside by a resume: neither is a checkpoint)."""
    folder = checkpoint_dir(run_dir)
    found = [path for path in folder.glob("step-*") if _NAME.match(path.name)
             and (path / META_FILE).is_file()] if folder.is_dir() else []
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_meta(path: Path) -> dict:
    """The checkpoint's `meta.json`: its step, the run's extra entries, its files' checksums."""
    meta, problem = _read_meta(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}; use another checkpoint of the run.")
    return meta


def checkpoint_step(path: Path) -> int:
    """The number of optimizer steps the checkpoint at `path` was written after."""
    return checkpoint_meta(path)["step"]


def _read_meta(path: Path) -> tuple[dict, str]:
    """meta.json's contents and "" or, when it is unreadable, {} and what is wrong."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        return {}, f"{META_FILE} missing (the checkpoint is incomplete)"
    except (ValueError, UnicodeDecodeError) as error:
        return {}, f"{META_FILE} is damaged ({type(error).__name__})"
    step = meta.get("step") if isinstance(meta, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        return {}, f"{META_FILE} is damaged (no step)"
    named = _NAME.match(path.name)
    if named and int(named.group(1)) != step:
        return {}, f"{META_FILE} is damaged (step {step} in folder {path.name})"
    return meta, ""


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint at `path`, or None when every file is as written.

    A checkpoint written before checksums passes with a warning: it cannot be checked."""
    meta, problem = _read_meta(path)
    if problem:
        return problem
    if CHECKSUMS_KEY not in meta:
        logger.warning("%s was written without checksums (by an older qdiff) and cannot be "
                       "checked; loading it as it is", path)
        return None
    files = meta[CHECKSUMS_KEY]
    if not well_formed(files):
        return f"{META_FILE} is damaged (its file list)"
    unlisted = [name for name in _REQUIRED if name not in files]
    if unlisted:
        return f"{META_FILE} is damaged ({unlisted[0]} not listed)"
    return first_problem(path, files)


def checked_checkpoint(path: Path) -> Path:
    """`path` when it checks out; a one-line CheckpointError naming the problem otherwise."""
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(f"{path}: {problem}; the checkpoint is damaged. Use another "
                              f"checkpoint of the run (or retrain).")
    return path


def newest_good_checkpoint(run_dir: Path, set_aside: bool = True) -> Path | None:
    """The newest checkpoint of the run that checks out (None when the run has none).

    Damaged newer ones are named in a warning and (with `set_aside`: by one process only)
    renamed `<name>.damaged`: they are not loaded, and not counted when the next save keeps
    the newest two. With checkpoints but none good, a CheckpointError names each and says
    to start again."""
    damaged: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in damaged if set_aside else ():
                logger.warning("%s: %s; resuming from %s instead (the damaged one is kept as "
                               "%s)", bad, why, path.name, bad.name + DAMAGED_SUFFIX)
                set_checkpoint_aside(bad, DAMAGED_SUFFIX)
            return path
        damaged.append((path, problem))
    if damaged:
        listing = "; ".join(f"{path.name}: {why}" for path, why in damaged)
        raise CheckpointError(f"No usable checkpoint in {checkpoint_dir(run_dir)} ({listing}); "
                              f"start the run again with --overwrite.")
    return None


def set_checkpoint_aside(path: Path, suffix: str) -> None:
    """Rename checkpoint `path` to `<name><suffix>`: kept for inspection, but no longer a
    checkpoint (`list_checkpoints` skips it), so neither loaded nor counted as kept."""
    target = path.with_name(path.name + suffix)
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)


def load_checkpoint(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: Optional[ParameterEMA] = None) -> None:
    """Restore student, optimizer and average in place (`path` checked by the caller:
    `newest_good_checkpoint`)."""
    _load_student(path, student)
    saved_average = (path / EMA_FILE).is_file()
    if saved_average != (ema is not None):
        raise ConfigError(f"{path} was written {'with' if saved_average else 'without'} an "
                          f"average of the parameters, and this run is configured "
                          f"{'without' if saved_average else 'with'} one: resume with "
                          f"distill.ema_decay as the run started, or start a new run (--overwrite).")
    if ema is not None:
        ema.load_state_dict(load_file(path / EMA_FILE), str(path / EMA_FILE))
    rest = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_state(load_file(path / "optimizer.safetensors"), rest))


def load_trained_student(path: Path, student: nn.Module, averaged: bool = True) -> None:
    """The student the run would export from this checkpoint: the parameters' average where
    the run keeps one, the live parameters otherwise or with `averaged=False` (for
    evaluating a checkpoint). A damaged checkpoint is refused with a CheckpointError."""
    _load_student(checked_checkpoint(path), student)
    if averaged and (path / EMA_FILE).is_file():
        copy_average(averaged_parameters(student), load_file(path / EMA_FILE), str(path / EMA_FILE))


def _load_student(path: Path, student: nn.Module) -> None:
    state = load_file(path / "student.safetensors")
    missing, unexpected = student.load_state_dict(state, strict=False)
    frozen = {name for name, p in student.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise ConfigError(f"{path} does not match this student (missing "
                          f"{sorted(set(missing) - frozen)[:5]}, unexpected {unexpected[:5]}); "
                          f"was the config changed since the run started?")
