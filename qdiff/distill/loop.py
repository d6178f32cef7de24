"""The distillation loop: the stock pipeline walks, the student learns at each denoiser call.

Read it top to bottom: build the students (quantize a copy of each denoiser, calibrate),
the optimizer and the Phi rank decay; then for every trajectory -- one call of the
teacher's own diffusers pipeline, with its scheduler and guidance, on a batch of
conditions -- `qdiff.walk.walk_with_student` hands each denoiser call to the `Trainer`:
the teacher answers without gradients, the student with them, and the loss between the
two is backpropagated. The calls of one denoising step (one, or one per guidance branch)
make one optimizer step, taken just before the next step's first call, so the student
answers every step updated (as in EfficientDM). Whoever `distill.walker` names gives the
pipeline its answer: the student by default, so it learns on the path it will sample.
With `distill.ema_decay`, the run's student is the moving average of the trained
parameters (`qdiff.distill.ema`). The run directory keeps the resolved config, a JSONL
log, checkpoints and sample grids, so a stopped run resumes where it stopped and ends
with the weights it would have had.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator, PartialState
from torch import nn
from tqdm import tqdm

from qdiff.calibrate import by_component, calibrate, trajectory_grid
from qdiff.config import ConfigError, RunConfig, save_config
from qdiff.distill.batches import trajectory_batch
from qdiff.distill.checkpoint import (DIVERGED_SUFFIX, checkpoint_step, latest_checkpoint,
                                     list_checkpoints, load_checkpoint, load_trained_student,
                                     newest_good_checkpoint, save_checkpoint,
                                     set_checkpoint_aside)
from qdiff.distill.divergence import (DivergenceError, DivergenceWatch, describe_collapse,
                                      nonfinite_quantizer_tables, saved_references)
from qdiff.distill.ema import ParameterEMA
from qdiff.distill.loss import call_loss
from qdiff.distill.optim import (build_optimizer, freeze_all_but_quant_params, lr_factor,
                                 set_learning_rates)
from qdiff.distill.run_dir import truncate_log
from qdiff.distill.samples import save_comparison_grid
from qdiff.errors import QdiffError
from qdiff.families import Family, family_for
from qdiff.quant import (QuantizationReport, RankDecay, nonpositive_step_tables, quantize_,
                         set_timesteps)
from qdiff.walk import DenoiserCall, StopWalk, use_scheduler, walk_with_student
from qdiff.walk.x0 import single_timestep

logger = logging.getLogger("qdiff.distill")


class NonFiniteLossError(QdiffError, RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class Student:
    model: nn.Module  # the one denoiser's student, or an nn.ModuleDict {component: student}
    report: QuantizationReport


def teacher_family(pipe, cfg: RunConfig) -> Family:
    """The family of `pipe` (a pipeline or a family) with `model.scheduler` in place.

    Args:
        pipe (DiffusionPipeline | Family): The teacher pipeline, or its family.
        cfg: The run's config.

    Returns:
        The family; its pipeline's scheduler is replaced when `model.scheduler` names another.

    Raises:
        ConfigError: No family fits the pipeline, or its prompts or images cannot be read.
    """
    family = family_for(pipe, cfg.model)
    if cfg.model.scheduler:
        use_scheduler(family.pipe, cfg.model.scheduler)
    return family


def build_student(pipe, cfg: RunConfig, calibrated: bool = True) -> Student:
    """A quantized copy of each of the teacher's denoisers, its scales initialised by PTQ.

    With `calibrated=False` (resuming), the activation tables come from the checkpoint.
    `pipe` is the teacher pipeline or its family; the students train in float32 whatever
    the teacher's dtype. One denoiser gives its student; several (Wan 2.2's two experts)
    an `nn.ModuleDict` of them by component.

    Args:
        pipe (DiffusionPipeline | Family): The teacher pipeline, or its family.
        cfg: The run's config (`quant`, `lora`, `distill`).
        calibrated: Set the activation scales by PTQ on teacher trajectories.

    Returns:
        The students (`model`: one, or an `nn.ModuleDict` by component) and the
        quantization report.

    Raises:
        ConfigError: The config does not fit the teacher (for example its scheduler's grid).
    """
    family = teacher_family(pipe, cfg)
    students, reports = {}, {}
    for index, component in enumerate(family.denoisers):
        model = copy.deepcopy(family.denoiser(component)).float()
        torch.manual_seed(cfg.seed + index)  # LoRA A's random init: the same student for the same config
        reports[component] = quantize_(model, family.quant_config(cfg.quant), cfg.lora, cfg.aux)
        students[component] = model
    distill_cfg = cfg.distill
    if calibrated:
        calibrate(students, family, cfg.quant.calibration_samples, distill_cfg.trajectory_steps,
                  distill_cfg.eta, distill_cfg.guidance_scale, seed=cfg.seed)
    else:  # size the tables now: the optimizer must hold the parameters the checkpoint fills
        grid = trajectory_grid(family, distill_cfg.trajectory_steps, distill_cfg.guidance_scale,
                               distill_cfg.eta)
        for model in students.values():
            set_timesteps(model, grid)
    for model in students.values():
        freeze_all_but_quant_params(model, distill_cfg.base_weight_lr > 0,
                                    distill_cfg.weight_scale_lr > 0)
    if len(students) == 1:
        return Student(next(iter(students.values())), next(iter(reports.values())))
    rows = [dataclasses.replace(row, name=f"{component}.{row.name}")
            for component, report in reports.items() for row in report]
    return Student(nn.ModuleDict(students), QuantizationReport(rows))


def student_at(pipe, cfg: RunConfig, checkpoint: Path, averaged: bool = True) -> nn.Module:
    """The student of a run of `cfg` at `checkpoint`, with Phi at the ranks it had there (as
    a resume builds it): the parameters' average where the run keeps one, the live
    parameters otherwise or with `averaged=False`.

    Args:
        pipe (DiffusionPipeline | Family): The teacher pipeline, or its family.
        cfg: The run's config.
        checkpoint: A checkpoint folder of the run.
        averaged: Take the averaged parameters where the run keeps them.

    Returns:
        The student, in eval mode.
    """
    model = build_student(pipe, cfg, calibrated=False).model
    if cfg.aux.enabled:
        RankDecay(model, cfg.aux, cfg.distill.steps).step(checkpoint_step(checkpoint))
    load_trained_student(checkpoint, model, averaged)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Keep only each block's inputs for the backward pass and recompute the rest there.

    Most of a training step's memory is what the fake-quantized layers keep for the backward
    pass, which LoRA does not shrink; this trades it for one more forward pass.

    Args:
        model: A student, or an `nn.ModuleDict` of them.

    Raises:
        ConfigError: A student's class does not support gradient checkpointing.
    """
    for student in (model.values() if isinstance(model, nn.ModuleDict) else [model]):
        if not getattr(student, "_supports_gradient_checkpointing", False):
            raise ConfigError(
                f"distill.gradient_checkpointing=true, but {type(student).__name__} cannot "
                f"recompute its blocks (it is not a diffusers model that supports gradient "
                f"checkpointing). Set distill.gradient_checkpointing=false.")
        student.enable_gradient_checkpointing()


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
    """Train the students for `cfg.distill.steps` steps; returns the trained model: the one
    denoiser's student, or an `nn.ModuleDict` of them by component.

    `pipe` is the teacher pipeline or its family (`qdiff.families`).
    `on_setup_done` is called (by the main process) once the student is built and any
    checkpoint loaded, before the run writes to `run_dir`: `--overwrite` deletes the
    previous run only then. A run that diverges raises `DivergenceError`.

    Args:
        pipe (DiffusionPipeline | Family): The teacher pipeline, or its family.
        cfg: The run's config.
        run_dir: The run's folder (checkpoints, log, samples).
        resume: Continue from the run's latest checkpoint.
        accelerator: The `Accelerator` to train with; None builds one from `cfg`.
        on_setup_done: Called once setup is done, before the run writes to `run_dir`.

    Returns:
        The trained student, or an `nn.ModuleDict` of them by component.

    Raises:
        DivergenceError: The loss diverged (see `distill.divergence`).
        NonFiniteLossError: The loss became NaN or infinite.
        ConfigError: The config does not fit the teacher.
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    resuming = resume and latest_checkpoint(run_dir) is not None
    family = teacher_family(pipe, cfg)
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
    trainer = Trainer(family, model, cfg, run_dir, accelerator, optimizer, decay, ema, step)
    try:  # the bar's line ends before an error or Ctrl-C is printed
        while trainer.step < total:
            index = trainer.step // per_trajectory
            ids, generators = trajectory_batch(cfg.seed, index, cfg.distill.batch_size,
                                               family.num_conditions,
                                               accelerator.process_index, accelerator.num_processes)
            call = family.call_kwargs(ids, generators, per_trajectory, cfg.distill.guidance_scale,
                                      cfg.distill.eta)
            trainer.start_trajectory(index)
            walk_with_student(family.pipe, by_component(model, family), call, trainer.on_call,
                              follow=trainer.follow, before_call=trainer.before_call)
            trainer.end_trajectory()
    finally:
        trainer.progress.close()
    if decay is not None:
        decay.finish()
    if ema is not None:
        ema.copy_to_model()
    return model


class Trainer:
    """Turns the denoiser calls of a walk into optimizer steps.

    A denoising step is the calls at one timestep: one call with both guidance branches
    batched, or one per branch. Each call's loss is backpropagated as it comes; the step's
    gradients are averaged over its calls (and over processes) and the optimizer steps in
    `before_call` of the next step's first call, or when the walk ends. Then come the
    step's bookkeeping: EMA, Phi's rank decay, the log, divergence checks, checkpoints.
    """

    def __init__(self, family: Family, model: nn.Module, cfg: RunConfig, run_dir: Path,
                 accelerator: Accelerator, optimizer: torch.optim.Optimizer,
                 decay: Optional[RankDecay], ema: Optional[ParameterEMA], step: int) -> None:
        self.family, self.model, self.cfg, self.run_dir = family, model, cfg, run_dir
        self.accelerator, self.optimizer, self.decay, self.ema = accelerator, optimizer, decay, ema
        self.step = step
        self.per_trajectory = cfg.distill.trajectory_steps
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.watch = DivergenceWatch(cfg.distill.divergence_factor, self.per_trajectory,
                                     **(saved_references(run_dir, step) if step else {}))
        self.log = RunLog(run_dir / "log.jsonl", accelerator.is_main_process)
        self.progress = tqdm(total=cfg.distill.steps, initial=step, desc=f"distilling {cfg.name}",
                             unit="step", disable=not accelerator.is_main_process)
        self.recent: list[float] = []
        self.collapsed: set[str] = set()
        self.grid_due = False
        self.start_trajectory(step // self.per_trajectory)

    # -- where a call sits -------------------------------------------------------------
    def start_trajectory(self, index: int) -> None:
        self.first_step = index * self.per_trajectory  # the global step of its first denoising step
        self.position = -1  # the denoising step within the trajectory
        self.timestep: Optional[float] = None
        self.losses: list[float] = []  # the calls' losses of the step being accumulated

    def _replayed(self) -> bool:
        """Whether the current denoising step was trained before a resume (replayed, not trained)."""
        return self.first_step + self.position < self.step

    def follow(self, call: DenoiserCall) -> str:
        if self._replayed():
            return "teacher"  # a resumed run replays the teacher's path up to where it stopped
        return self.cfg.distill.walker

    # -- the walk's callbacks ------------------------------------------------------------
    def before_call(self, call: DenoiserCall) -> None:
        """A call at a new timestep starts a denoising step: the previous one steps first."""
        timestep = single_timestep(call.timestep)
        if timestep == self.timestep:
            return
        self._finish_step()
        if self.step >= self.cfg.distill.steps:
            raise StopWalk
        self.timestep, self.position = timestep, self.position + 1

    def on_call(self, call: DenoiserCall, student_output: torch.Tensor,
                teacher_output: torch.Tensor) -> None:
        """Backpropagate the call's loss (a replayed step's calls are not trained)."""
        if self._replayed():
            return
        loss = call_loss(self.family.prediction(call.component, student_output),
                         self.family.prediction(call.component, teacher_output),
                         self.cfg.distill.loss, self.family.pipe.scheduler, call.timestep)
        if not torch.isfinite(loss):
            last = latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"Stopped at step {self.step}: the loss is {loss.item()} at timestep "
                f"{single_timestep(call.timestep):g}. The last good checkpoint is {last}; resume "
                f"from it with a lower distill.lr (or act_lr) and --allow-config-change, or check "
                f"the teacher.")
        self.accelerator.backward(loss)
        self.losses.append(loss.detach())

    def end_trajectory(self) -> None:
        self._finish_step()
        if self.grid_due:
            self.grid_due = False
            self._grid()

    # -- one optimizer step --------------------------------------------------------------
    def _finish_step(self) -> None:
        if not self.losses:
            return
        loss = _optimizer_step(self)
        diverged = self.watch.check(self.step, loss)
        if diverged:
            _stop_diverged(self.step, diverged, self.run_dir, first_checked=self.per_trajectory)
        if self.ema is not None:
            self.ema.update(self.step)
        rank = self.decay.current_rank if self.decay is not None else 0  # the rank this step trained
        self.step += 1
        if self.decay is not None:
            # Phi as the next step starts, before a checkpoint of `step` saves it: where
            # Phi's last phase ends, resuming there builds no Phi and finds none saved
            self.decay.step(self.step)
        self._bookkeeping(loss, rank)

    def _bookkeeping(self, loss: float, rank: int) -> None:
        cfg, step, total = self.cfg.distill, self.step, self.cfg.distill.steps
        self.recent = (self.recent + [loss])[-50:]
        lr = cfg.lr * lr_factor(step - 1, cfg.warmup_steps, total)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}", rank=rank)
        if step % cfg.log_every == 0 or step == total:
            self.log.write({"step": step, "loss": loss, "lr": lr, "aux_rank": rank})
            _warn_collapsed_tables(self.model, self.collapsed, step, self.accelerator.is_main_process)
        if step == total or not (step % cfg.log_every and step % cfg.checkpoint_every):
            _stop_if_collapsed(self.model, step, self.run_dir)  # before a checkpoint can save it
        if not self.accelerator.is_main_process:
            return
        if step % cfg.checkpoint_every == 0 or step == total:
            save_checkpoint(self.run_dir, step, self.model, self.optimizer,
                            {"loss_mean_last_50": sum(self.recent) / len(self.recent),
                             **self.watch.meta()}, self.ema)
        if step % cfg.sample_every == 0 or step == total:
            self.grid_due = True  # drawn when the walk ends: the pipeline is mid-call now

    def _grid(self) -> None:
        """The sample grid of the student the run would export now (the average, with an EMA)."""
        eval_cfg = self.cfg.eval
        with self.ema.averaged() if self.ema is not None else contextlib.nullcontext():
            save_comparison_grid(self.family, by_component(self.model, self.family),
                                 self.run_dir / "samples" / f"step-{self.step:07d}.png",
                                 eval_cfg.steps, eval_cfg.guidance_scale, seed=eval_cfg.seed,
                                 batch_size=self.cfg.distill.batch_size)


def _optimizer_step(trainer: Trainer) -> float:
    """One optimizer step on the gradients of the trainer's current denoising step, averaged
    over its calls and over the processes; returns the step's mean loss."""
    cfg, losses = trainer.cfg.distill, trainer.losses
    trainer.losses = []
    world = trainer.accelerator.num_processes
    for parameter in trainer.trainable:
        if parameter.grad is None:
            continue
        if world > 1:
            dist.all_reduce(parameter.grad)
        parameter.grad /= len(losses) * world
    set_learning_rates(trainer.optimizer, lr_factor(trainer.step, cfg.warmup_steps, cfg.steps))
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainer.trainable, cfg.grad_clip)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return trainer.accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()


def _warn_collapsed_tables(model: nn.Module, warned: set[str], step: int, main: bool) -> None:
    """Say so when an activation step size has crossed zero (once per table): the run goes on,
    but that entry's grid is mirrored, which can make a low-bit run diverge
    (docs/notes/research-log.md)."""
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


def mean_recent_loss(run_dir: Path, last: int = 50) -> float:
    """Mean loss of the last logged steps (for the summary).

    Args:
        run_dir: The run's folder (its `log.jsonl`).
        last: The number of logged steps to average.

    Returns:
        The mean loss, or NaN when nothing is logged.
    """
    lines = (run_dir / "log.jsonl").read_text().splitlines()[-last:]
    losses = [json.loads(line)["loss"] for line in lines]
    return sum(losses) / len(losses) if losses else math.nan
