"""The distillation loop: trajectories from noise, the student learns each step of them.

Read it top to bottom: build the student (quantize, calibrate), the optimizer and the
Phi rank decay; then for every denoising step of every trajectory, ask teacher and
student the same question (x_t, t, condition) and move the student towards the
teacher's answer -- one optimizer step per denoising step, as in EfficientDM. Whoever
`distill.walker` names takes the step to the next x_t: the student by default, so it
learns on the path it will sample. With `distill.ema_decay`, the run's student is the
moving average of the trained parameters (`qdiff.distill.ema`). The run directory keeps the
resolved config, a JSONL log, checkpoints and sample grids, so a stopped run resumes
where it stopped and ends with the weights it would have had.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from torch import nn
from tqdm import tqdm

from qdiff.calibrate import calibrate
from qdiff.config import ConfigError, RunConfig, save_config
from qdiff.distill.batches import trajectory_batch
from qdiff.distill.checkpoint import (DIVERGED_SUFFIX, checkpoint_step, latest_checkpoint,
                                     list_checkpoints, load_checkpoint, load_trained_student,
                                     newest_good_checkpoint, save_checkpoint,
                                     set_checkpoint_aside)
from qdiff.distill.divergence import (DivergenceError, DivergenceWatch, describe_collapse,
                                      nonfinite_quantizer_tables, saved_references)
from qdiff.distill.ema import ParameterEMA
from qdiff.distill.optim import (build_optimizer, freeze_all_but_quant_params, lr_factor,
                                 set_learning_rates)
from qdiff.distill.run_dir import truncate_log
from qdiff.distill.samples import save_comparison_grid
from qdiff.distill.trajectory import TrajectoryStep, TrajectoryWalk, trajectory_timesteps
from qdiff.errors import QdiffError
from qdiff.families import combine_branches, family_for
from qdiff.quant import (QuantizationReport, RankDecay, nonpositive_step_tables, quantize_,
                         set_timesteps)

logger = logging.getLogger("qdiff.distill")


class NonFiniteLossError(QdiffError, RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class Student:
    model: nn.Module
    report: QuantizationReport


def build_student(pipe, cfg: RunConfig, calibrated: bool = True) -> Student:
    """A quantized copy of the teacher's denoiser, its scales initialised by PTQ.

    With `calibrated=False` (resuming), the activation tables come from the checkpoint.
    `pipe` is the teacher pipeline or its family adapter; the student trains in float32
    whatever the teacher's dtype.
    """
    family = family_for(pipe, cfg.model)
    model = copy.deepcopy(family.denoiser).float()
    torch.manual_seed(cfg.seed)  # LoRA A's random init: the same student for the same config
    report = quantize_(model, family.quant_config(cfg.quant), cfg.lora, cfg.aux)
    if calibrated:
        calibrate(model, family, cfg.quant.calibration_samples, cfg.distill.trajectory_steps,
                  cfg.distill.eta, cfg.distill.guidance_scale, seed=cfg.seed)
    else:  # size the tables now: the optimizer must hold the parameters the checkpoint fills
        set_timesteps(model, trajectory_timesteps(family, cfg.distill.trajectory_steps))
    freeze_all_but_quant_params(model, cfg.distill.base_weight_lr > 0, cfg.distill.weight_scale_lr > 0)
    return Student(model, report)


def student_at(pipe, cfg: RunConfig, checkpoint: Path, averaged: bool = True) -> nn.Module:
    """The student of a run of `cfg` at `checkpoint`, with Phi at the ranks it had there (as
    a resume builds it): the parameters' average where the run keeps one, the live
    parameters otherwise or with `averaged=False`."""
    model = build_student(pipe, cfg, calibrated=False).model
    if cfg.aux.enabled:
        RankDecay(model, cfg.aux, cfg.distill.steps).step(checkpoint_step(checkpoint))
    load_trained_student(checkpoint, model, averaged)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Keep only each block's inputs for the backward pass and recompute the rest there.

    Most of a training step's memory is what the fake-quantized layers keep for the backward
    pass, which LoRA does not shrink; this trades it for one more forward pass."""
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise ConfigError(
            f"distill.gradient_checkpointing=true, but {type(model).__name__} cannot recompute "
            f"its blocks (it is not a diffusers model that supports gradient checkpointing). "
            f"Set distill.gradient_checkpointing=false.")
    model.enable_gradient_checkpointing()


def distillation_loss(student_output: torch.Tensor, step: TrajectoryStep,
                      kind: str, target: str = "guided") -> torch.Tensor:
    """The distance between the student's and the teacher's guided noise predictions, or
    (`target="branches"`, `student_output` then `branch_noise`'s) their predictions before
    guidance combines them.

    "mse" / "l1": of the noise predictions themselves. Their error is largest near t = 0,
    where it hardly changes the image, and smallest at the noisy start, where it decides
    the image -- so "x0" (MSE of the images the two predictions imply, i.e. weighted by
    (d x0 / d eps)^2) and "update" (MSE of the DDIM steps they imply) weight every step by
    its effect on the sample instead. eval/results/quality/finetune.md compares them.

    Why "branches": the quantization error the LoRA can correct is shared by the two
    predictions (same weights), and guidance passes it on once; the error that differs
    between them guidance multiplies by about s. So the guided loss sees what can be learned
    through noise amplified s-fold, the branches' loss does not.
    """
    teacher_output = step.teacher_branches if target == "branches" else step.teacher_output
    if kind == "l1":
        return F.l1_loss(student_output, teacher_output)
    scale = {"mse": 1.0, "x0": step.x0_scale, "update": step.update_scale}[kind]
    return F.mse_loss(student_output * scale, teacher_output * scale)


class RunLog:
    """JSONL log (one line per logged step) and the progress bar's numbers."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.started = time.time()

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as log:
                log.write(json.dumps({**record, "elapsed_s": round(time.time() - self.started, 2)})
                          + "\n")


def _train_step(family, student: nn.Module, step, cfg: RunConfig, accelerator: Accelerator,
                optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter]
                ) -> tuple[float, torch.Tensor]:
    """One optimizer step on one denoising step; returns the loss and the student's answer."""
    guidance, target = cfg.distill.guidance_scale, cfg.distill.target
    branches = family.branch_noise(step.model_input, step.timestep, step.context, guidance,
                                   denoiser=student)
    student_output = combine_branches(branches, guidance)
    loss = distillation_loss(branches if target == "branches" else student_output, step,
                             cfg.distill.loss, target)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss.item()} at timestep {int(step.timestep)}")
    accelerator.backward(loss)
    if cfg.distill.grad_clip > 0:
        accelerator.clip_grad_norm_(trainable, cfg.distill.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(loss.detach(), reduction="mean").item(), student_output.detach()


def _resume_step(run_dir: Path, student: nn.Module, optimizer, decay: Optional[RankDecay],
                 ema: Optional[ParameterEMA]) -> int:
    """Load the newest checkpoint that checks out (a damaged newer one is named and set
    aside, by the main process); return its step, 0 without one."""
    checkpoint = newest_good_checkpoint(run_dir, set_aside=PartialState().is_main_process)
    if checkpoint is None:
        return 0
    step = checkpoint_step(checkpoint)
    if decay is not None:
        decay.step(step)  # shrink Phi to the saved ranks before loading it
    load_checkpoint(checkpoint, student, optimizer, ema)
    logger.info("resumed from %s (step %d)", checkpoint, step)
    return step


def distill(pipe, cfg: RunConfig, run_dir: Path, resume: bool = False,
            accelerator: Optional[Accelerator] = None,
            on_setup_done: Callable[[], None] | None = None) -> nn.Module:
    """Train the student for `cfg.distill.steps` steps; returns it (unwrapped).

    `pipe` is the teacher pipeline or its family adapter (`qdiff.families`).
    `on_setup_done` is called (by the main process) once the student is built and any
    checkpoint loaded, before the run writes to `run_dir`: `--overwrite` deletes the
    previous run only then. A run that diverges raises `DivergenceError`.
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    resuming = resume and latest_checkpoint(run_dir) is not None
    family = family_for(pipe, cfg.model)
    student = build_student(family, cfg, calibrated=not resuming)
    if main:
        logger.info("quantized layers:\n%s", student.report)
    model = student.model
    if cfg.distill.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = build_optimizer(model, cfg)
    total, per_trajectory = cfg.distill.steps, cfg.distill.trajectory_steps
    decay = RankDecay(model, cfg.aux, total, optimizer) if cfg.aux.enabled else None
    ema = (ParameterEMA(model, cfg.distill.ema_decay, cfg.distill.ema_ramp)
           if cfg.distill.ema_decay > 0 else None)
    step = _resume_step(run_dir, model, optimizer, decay, ema) if resuming else 0
    if decay is not None:
        decay.step(step)  # Phi as the first step starts (where a resume has already put it)
    if main:  # only now: a refused resume leaves the run's saved config as it was
        if on_setup_done is not None:
            on_setup_done()
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        dropped = truncate_log(run_dir / "log.jsonl", step)
        if dropped:
            logger.info("log.jsonl: dropped %d lines after step %d, which this run trains again",
                        dropped, step)
    watch = DivergenceWatch(cfg.distill.divergence_factor, per_trajectory,
                            **(saved_references(run_dir, step) if step else {}))
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    log = RunLog(run_dir / "log.jsonl", main)
    progress = tqdm(total=total, initial=step, desc=f"distilling {cfg.name}", unit="step",
                    disable=not main)
    recent: list[float] = []
    collapsed: set[str] = set()
    try:  # the bar's line ends before an error or Ctrl-C is printed
        while step < total:
            index = step // per_trajectory
            labels, generators = trajectory_batch(cfg.seed, index, cfg.distill.batch_size,
                                                  family.num_conditions,
                                                  accelerator.process_index, accelerator.num_processes)
            walk = TrajectoryWalk(family, labels, per_trajectory, cfg.distill.eta,
                                  cfg.distill.guidance_scale, generators)
            while not walk.done:
                point = walk.point()
                if index * per_trajectory + point.index < step:
                    walk.advance(point.teacher_output)  # a resumed run replays up to where it stopped
                    continue
                set_learning_rates(optimizer, lr_factor(step, cfg.distill.warmup_steps, total))
                try:
                    loss, student_output = _train_step(family, model, point, cfg, accelerator,
                                                       optimizer, trainable)
                except NonFiniteLossError as error:
                    last = latest_checkpoint(run_dir)
                    raise NonFiniteLossError(
                        f"Stopped at step {step}: {error}. The last good checkpoint is {last}; "
                        f"resume from it with a lower distill.lr (or act_lr) and "
                        f"--allow-config-change, or check the teacher.") from None
                diverged = watch.check(step, loss)
                if diverged:
                    _stop_diverged(step, diverged, run_dir, first_checked=per_trajectory)
                walk.advance(student_output if cfg.distill.walker == "student" else point.teacher_output)
                if ema is not None:
                    ema.update(step)
                rank = decay.current_rank if decay is not None else 0  # the rank this step trained
                step += 1
                if decay is not None:
                    # Phi as the next step starts, before a checkpoint of `step` saves it: where
                    # Phi's last phase ends, resuming there builds no Phi and finds none saved
                    decay.step(step)
                recent = (recent + [loss])[-50:]
                lr = cfg.distill.lr * lr_factor(step - 1, cfg.distill.warmup_steps, total)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}", rank=rank)
                if step % cfg.distill.log_every == 0 or step == total:
                    log.write({"step": step, "loss": loss, "lr": lr, "aux_rank": rank})
                    _warn_collapsed_tables(model, collapsed, step, main)
                if step == total or not (step % cfg.distill.log_every
                                         and step % cfg.distill.checkpoint_every):
                    _stop_if_collapsed(model, step, run_dir)  # before a checkpoint can save it
                _periodic(step, cfg, run_dir, family, accelerator, model, optimizer, recent, ema,
                          watch.meta())
                if step >= total:
                    break
    finally:
        progress.close()
    if decay is not None:
        decay.finish()
    if ema is not None:
        ema.copy_to_model()
    return accelerator.unwrap_model(model)


def _warn_collapsed_tables(model: nn.Module, warned: set[str], step: int, main: bool) -> None:
    """Say so when an activation step size has crossed zero (once per table): the run goes on,
    but that entry's grid is now mirrored -- what broke W4A4 runs down (docs/notes/research-log.md)."""
    new = [name for name in nonpositive_step_tables(model) if name not in warned]
    warned.update(new)
    if new and main:
        logger.warning("step %d: %d activation step-size tables crossed zero (%s); lower "
                       "distill.act_lr or set distill.scale_aware_act_lr=true",
                       step, len(new), ", ".join(new[:3]) + (", ..." if len(new) > 3 else ""))


def _stop_diverged(step: int, problem: str, run_dir: Path, first_checked: int = 0) -> None:
    """Raise DivergenceError; the last good checkpoint is the newest one whose student a
    check has passed: written after `first_checked` steps and before `step`'s."""
    checkpoints = list_checkpoints(run_dir)
    good = [path for path in checkpoints if first_checked <= checkpoint_step(path) < step]
    if PartialState().is_main_process:  # a resume must not take an unchecked, newer one
        for path in checkpoints:
            if checkpoint_step(path) >= step:
                set_checkpoint_aside(path, DIVERGED_SUFFIX)
                logger.warning("%s holds the diverged student; kept as %s", path,
                               path.name + DIVERGED_SUFFIX)
    raise DivergenceError(
        f"Stopped at step {step}, nothing exported: the run diverged: {problem}. The last good "
        f"checkpoint is {good[-1] if good else 'none'}; start again with a lower distill.lr "
        f"(or act_lr) (--overwrite), or set distill.divergence_factor=0 to train on.")


def _stop_if_collapsed(model: nn.Module, step: int, run_dir: Path) -> None:
    """Stop when a quantizer parameter or table is no longer finite (a scan of every
    quantizer: at log and checkpoint steps only)."""
    broken = nonfinite_quantizer_tables(model)
    if broken:
        _stop_diverged(step, describe_collapse(broken), run_dir)


def _periodic(step: int, cfg: RunConfig, run_dir: Path, family, accelerator: Accelerator,
              model: nn.Module, optimizer, recent: list[float], ema: Optional[ParameterEMA],
              references: dict | None = None) -> None:
    """Checkpoints and sample grids every N steps (and at the end), by the main process.

    The grids show the student the run would export now: the average, with an EMA."""
    if not accelerator.is_main_process:
        return
    done = step == cfg.distill.steps
    if step % cfg.distill.checkpoint_every == 0 or done:
        save_checkpoint(run_dir, step, accelerator.unwrap_model(model), optimizer,
                        {"loss_mean_last_50": sum(recent) / len(recent), **(references or {})}, ema)
    if step % cfg.distill.sample_every == 0 or done:
        with ema.averaged() if ema is not None else contextlib.nullcontext():
            save_comparison_grid(family, accelerator.unwrap_model(model),
                                 run_dir / "samples" / f"step-{step:07d}.png",
                                 cfg.eval.steps, cfg.eval.guidance_scale, seed=cfg.eval.seed,
                                 batch_size=cfg.distill.batch_size)


def mean_recent_loss(run_dir: Path, last: int = 50) -> float:
    """Mean loss of the last logged steps (for the summary)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()[-last:]
    losses = [json.loads(line)["loss"] for line in lines]
    return sum(losses) / len(losses) if losses else math.nan
