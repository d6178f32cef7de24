"""The distillation loop: the teacher walks its trajectories, the student learns each step.

Read it top to bottom: build the student (quantize, calibrate), the optimizer and the
Phi rank decay; then for every denoising step of every teacher trajectory, ask the
student the same question (x_t, t, class) and move it towards the teacher's answer --
one optimizer step per denoising step, as in EfficientDM. The run directory keeps the
resolved config, a JSONL log, checkpoints and sample grids, so a stopped run resumes
where it stopped and ends with the weights it would have had.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from qdiff.calibrate import calibrate
from qdiff.config import RunConfig
from qdiff.distill.batches import trajectory_batch
from qdiff.distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from qdiff.distill.optim import (build_optimizer, freeze_all_but_quant_params, lr_factor,
                                 set_learning_rates)
from qdiff.distill.samples import save_comparison_grid
from qdiff.distill.trajectory import teacher_trajectory, trajectory_timesteps
from qdiff.quant import QuantizationReport, RankDecay, quantize_, set_timesteps

logger = logging.getLogger("qdiff.distill")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class Student:
    model: nn.Module
    report: QuantizationReport


def build_student(pipe, cfg: RunConfig, calibrated: bool = True) -> Student:
    """A quantized copy of the teacher's denoiser, its scales initialised by PTQ.

    With `calibrated=False` (resuming), the activation tables come from the checkpoint.
    """
    model = copy.deepcopy(pipe.unet)
    torch.manual_seed(cfg.seed)  # LoRA A's random init: the same student for the same config
    report = quantize_(model, cfg.quant, cfg.lora, cfg.aux)
    if calibrated:
        calibrate(model, pipe, cfg.quant.calibration_samples, cfg.distill.trajectory_steps,
                  cfg.distill.eta, cfg.distill.guidance_scale, seed=cfg.seed)
    else:  # size the tables now: the optimizer must hold the parameters the checkpoint fills
        set_timesteps(model, trajectory_timesteps(pipe, cfg.distill.trajectory_steps))
    freeze_all_but_quant_params(model)
    return Student(model, report)


def distillation_loss(student_output: torch.Tensor, teacher_output: torch.Tensor,
                      kind: str, update_scale: float = 1.0) -> torch.Tensor:
    """MSE or L1 of the noise predictions; "update": MSE of the DDIM steps they imply.

    The noise-prediction error near t = 0 is large but hardly moves the sample; weighting
    by (d x_prev / d eps)^2 gives every step the weight of its effect on the trajectory.
    """
    if kind == "l1":
        return F.l1_loss(student_output, teacher_output)
    if kind == "update":
        return F.mse_loss(student_output * update_scale, teacher_output * update_scale)
    return F.mse_loss(student_output, teacher_output)


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


def _train_step(pipe, student: nn.Module, step, cfg: RunConfig, accelerator: Accelerator,
                optimizer: torch.optim.Optimizer, trainable: list[nn.Parameter]) -> float:
    guidance = cfg.distill.guidance_scale
    student_output = pipe.guided_noise(step.model_input, step.timestep, step.context, guidance,
                                       denoiser=student)
    loss = distillation_loss(student_output, step.teacher_output, cfg.distill.loss,
                             step.update_scale)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss.item()} at timestep {int(step.timestep)}")
    accelerator.backward(loss)
    if cfg.distill.grad_clip > 0:
        accelerator.clip_grad_norm_(trainable, cfg.distill.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(loss.detach(), reduction="mean").item()


def _resume_step(run_dir: Path, student: nn.Module, optimizer, decay: Optional[RankDecay]) -> int:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return 0
    step = json.loads((checkpoint / "meta.json").read_text())["step"]
    if decay is not None:
        decay.step(step)  # shrink Phi to the saved ranks before loading it
    load_checkpoint(checkpoint, student, optimizer)
    logger.info("resumed from %s (step %d)", checkpoint, step)
    return step


def distill(pipe, cfg: RunConfig, run_dir: Path, resume: bool = False,
            accelerator: Optional[Accelerator] = None) -> nn.Module:
    """Train the student for `cfg.distill.steps` steps; returns it (unwrapped)."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    resuming = resume and latest_checkpoint(run_dir) is not None
    student = build_student(pipe, cfg, calibrated=not resuming)
    if main:
        logger.info("quantized layers:\n%s", student.report)
    model = student.model
    optimizer = build_optimizer(model, cfg)
    total, per_trajectory = cfg.distill.steps, cfg.distill.trajectory_steps
    decay = RankDecay(model, cfg.aux, total, optimizer) if cfg.aux.enabled else None
    step = _resume_step(run_dir, model, optimizer, decay) if resuming else 0
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir / "log.jsonl", main)
    progress = tqdm(total=total, initial=step, desc=f"distilling {cfg.name}", unit="step",
                    disable=not main)
    recent: list[float] = []
    while step < total:
        index = step // per_trajectory
        labels, generators = trajectory_batch(cfg.seed, index, cfg.distill.batch_size,
                                              pipe.class_embedder.null_class,
                                              accelerator.process_index, accelerator.num_processes)
        for point in teacher_trajectory(pipe, labels, per_trajectory, cfg.distill.eta,
                                        cfg.distill.guidance_scale, generators):
            if index * per_trajectory + point.index < step:
                continue  # a resumed run replays the teacher up to where it stopped
            if decay is not None:
                decay.step(step)
            set_learning_rates(optimizer, lr_factor(step, cfg.distill.warmup_steps, total))
            try:
                loss = _train_step(pipe, model, point, cfg, accelerator, optimizer, trainable)
            except NonFiniteLossError as error:
                last = latest_checkpoint(run_dir)
                raise NonFiniteLossError(
                    f"Stopped at step {step}: {error}. The last good checkpoint is {last}; "
                    f"resume with a lower distill.lr (or act_lr), or check the teacher.") from None
            step += 1
            recent = (recent + [loss])[-50:]
            rank = decay.current_rank if decay is not None else 0
            lr = cfg.distill.lr * lr_factor(step - 1, cfg.distill.warmup_steps, total)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}", rank=rank)
            if step % cfg.distill.log_every == 0 or step == total:
                log.write({"step": step, "loss": loss, "lr": lr, "aux_rank": rank})
            _periodic(step, cfg, run_dir, pipe, accelerator, model, optimizer, recent)
            if step >= total:
                break
    progress.close()
    if decay is not None:
        decay.finish()
    return accelerator.unwrap_model(model)


def _periodic(step: int, cfg: RunConfig, run_dir: Path, pipe, accelerator: Accelerator,
              model: nn.Module, optimizer, recent: list[float]) -> None:
    """Checkpoints and sample grids every N steps (and at the end), by the main process."""
    if not accelerator.is_main_process:
        return
    done = step == cfg.distill.steps
    if step % cfg.distill.checkpoint_every == 0 or done:
        save_checkpoint(run_dir, step, accelerator.unwrap_model(model), optimizer,
                        {"loss_mean_last_50": sum(recent) / len(recent)})
    if step % cfg.distill.sample_every == 0 or done:
        save_comparison_grid(pipe, accelerator.unwrap_model(model),
                             run_dir / "samples" / f"step-{step:07d}.png",
                             cfg.eval.steps, cfg.eval.guidance_scale, seed=cfg.eval.seed)


def mean_recent_loss(run_dir: Path, last: int = 50) -> float:
    """Mean loss of the last logged steps (for the summary)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()[-last:]
    losses = [json.loads(line)["loss"] for line in lines]
    return sum(losses) / len(losses) if losses else math.nan
