"""Student memory and quality with the frozen base weight held as packed integer codes.

    python -m eval.training_cost.packed_base          # W4A4 student of the embedded teacher, 200 steps

`quant.packed_base_weight=true` stores W0 as its 4-bit codes (two per byte) plus
per-channel scales instead of a float copy, as EfficientDM's code does, so a student
costs a fraction of its teacher's memory. Both students start from the same
calibration and train the same steps on the same trajectories; the table compares the
bytes of each student's tensors and its distillation loss on held-out trajectories
before and after: the MSE of its raw output to the teacher's at each denoiser call of the
stock pipeline (conditional and null branches; it was the guided noise's MSE before the
pipeline walked). Writes eval/results/training_cost/packed-base.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import qdiff
from eval.common.report import results_dir, write_markdown
from eval.common.walk import student_answer
from qdiff.config import load_config
from qdiff.distill.loop import build_student, distill
from qdiff.families import family_for
from qdiff.walk import record_calls

RESULTS = results_dir("training_cost")
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-ldm-w4a4.yaml"


def tensor_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def held_out_calls(pipe, guidance: float) -> list:
    """The teacher's denoiser calls of 10 held-out 20-step trajectories (eta 1) of the stock
    pipeline, each with both guidance branches."""
    kwargs = family_for(pipe).call_kwargs(torch.arange(10), torch.Generator().manual_seed(424242),
                                          20, guidance, eta=1.0)
    return record_calls(pipe, kwargs)[1]


@torch.no_grad()
def held_out_loss(pipe, student: nn.Module, calls: list) -> float:
    """Mean over the calls of the MSE of the student's raw output to the teacher's."""
    losses = [torch.nn.functional.mse_loss(student_answer(pipe, student, call).float(),
                                           call.output.float()).item() for call in calls]
    return sum(losses) / len(losses)


def main() -> None:
    pipe = qdiff.load_pipeline(load_config(CONFIG).model.path)
    pipe.set_progress_bar_config(disable=True)
    rows = [f"| FP teacher UNet | {tensor_bytes(pipe.unet):,} | | |"]
    for packed in (False, True):
        cfg = load_config(CONFIG, ["output_dir=runs/bench-packed", f"name=packed-{packed}",
                                   f"quant.packed_base_weight={packed}", "distill.steps=200",
                                   "export.enabled=false", "distill.sample_every=1000"])
        calls = held_out_calls(pipe, cfg.distill.guidance_scale)
        start = held_out_loss(pipe, build_student(pipe, cfg).model, calls)
        student = distill(pipe, cfg, cfg.run_dir)
        rows.append(f"| W4A4 student, packed base = {packed} | {tensor_bytes(student):,} | "
                    f"{start:.5f} | {held_out_loss(pipe, student, calls):.5f} |")
        print(rows[-1], flush=True)
    lines = ["# Packed base weights: student memory and quality", "",
             f"Command: `{' '.join(['python', '-m', 'eval.training_cost.packed_base', *sys.argv[1:]])}`", "",
             "Bytes of all parameters and buffers (LoRA, step sizes and activation tables "
             "included); distillation loss (MSE to the teacher's raw output at each denoiser call "
             "of the stock pipeline, conditional and null branches) on 10 held-out 20-step "
             "trajectories, before and after 200 steps.", "",
             "| model | tensor bytes | loss before | loss after |", "|---|---:|---:|---:|", *rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_markdown(RESULTS / "packed-base.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
