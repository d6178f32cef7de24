"""Checkpoints of a distillation run: safetensors for tensors, JSON for the rest.

A checkpoint holds only what training changes: the student's trainable parameters and
its buffers (activation tables, packed codes), the optimizer state and, with
`distill.ema_decay`, the parameters' average (`qdiff.distill.ema`). The frozen base
weights come back from the teacher when the student is rebuilt. Each checkpoint is
written to `<name>.tmp` and renamed when complete, so a crash never leaves one that
looks finished; the two newest are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qdiff.config import ConfigError
from qdiff.distill.ema import EMA_FILE, ParameterEMA, averaged_parameters, copy_average

KEEP_LAST = 2
META_FILE = "meta.json"


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
    (partial / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in list_checkpoints(run_dir)[:-KEEP_LAST]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp` folder is a crash, never a checkpoint)."""
    folder = checkpoint_dir(run_dir)
    found = [path for path in folder.glob("step-*") if not path.name.endswith(".tmp")
             and (path / META_FILE).is_file()] if folder.is_dir() else []
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    """The number of optimizer steps the checkpoint at `path` was written after."""
    return json.loads((path / META_FILE).read_text())["step"]


def load_checkpoint(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: Optional[ParameterEMA] = None) -> None:
    """Restore student, optimizer and average in place."""
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
    evaluating a checkpoint)."""
    _load_student(path, student)
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
