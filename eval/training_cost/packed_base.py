"""Student memory and quality with the frozen base weight held as packed integer codes.

    python -m eval.training_cost.packed_base          # W4A4 student of the embedded teacher, 200 steps

`quant.packed_base_weight=true` stores W0 as its 4-bit codes (two per byte) plus
per-channel scales instead of a float copy, as EfficientDM's code does, so a student
costs a fraction of its teacher's memory. Both students start from the same
calibration and train the same steps on the same trajectories; the table compares the
bytes of each student's tensors and its distillation loss on held-out trajectories
before and after. Writes eval/results/training_cost/packed-base.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import qdiff
from eval.common.report import results_dir, write_markdown
from qdiff.config import load_config
from qdiff.distill.loop import build_student, distill
from qdiff.distill.trajectory import teacher_trajectory

RESULTS = results_dir("training_cost")
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-ldm-w4a4.yaml"


def tensor_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def held_out_loss(pipe, student: nn.Module, guidance: float) -> float:
    losses = []
    for point in teacher_trajectory(pipe, torch.arange(10), 20, 1.0, guidance,
                                    torch.Generator().manual_seed(424242)):
        output = pipe.guided_noise(point.model_input, point.timestep, point.context, guidance,
                                   denoiser=student)
        losses.append(torch.nn.functional.mse_loss(output, point.teacher_output).item())
    return sum(losses) / len(losses)


def main() -> None:
    pipe = qdiff.load_pipeline(load_config(CONFIG).model.path)
    pipe.set_progress_bar_config(disable=True)
    rows = [f"| FP teacher UNet | {tensor_bytes(pipe.unet):,} | | |"]
    for packed in (False, True):
        cfg = load_config(CONFIG, ["output_dir=runs/bench-packed", f"name=packed-{packed}",
                                   f"quant.packed_base_weight={packed}", "distill.steps=200",
                                   "export.enabled=false", "distill.sample_every=1000"])
        guidance = cfg.distill.guidance_scale
        start = held_out_loss(pipe, build_student(pipe, cfg).model, guidance)
        student = distill(pipe, cfg, cfg.run_dir)
        rows.append(f"| W4A4 student, packed base = {packed} | {tensor_bytes(student):,} | "
                    f"{start:.5f} | {held_out_loss(pipe, student, guidance):.5f} |")
        print(rows[-1], flush=True)
    lines = ["# Packed base weights: student memory and quality", "",
             f"Command: `{' '.join(['python', '-m', 'eval.training_cost.packed_base', *sys.argv[1:]])}`", "",
             "Bytes of all parameters and buffers (LoRA, step sizes and activation tables "
             "included); distillation loss (MSE to the teacher's guided noise) on 10 held-out "
             "20-step trajectories, before and after 200 steps.", "",
             "| model | tensor bytes | loss before | loss after |", "|---|---:|---:|---:|", *rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_markdown(RESULTS / "packed-base.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
