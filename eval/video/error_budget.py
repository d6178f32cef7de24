"""Where the W4A4 error of the embedded video teacher comes from: weights or activations, which layers.

    python -m eval.video.error_budget     # -> eval/results/video/video-error-budget.md and .json

Each row is configs/tiny-wan-w4a4.yaml's calibrated PTQ student (no training) with the bits
changed: all layers at W4A4, W8A4 and W4A8, then activations at 8 bits except one group of
layers at 4; the rows marked "rotated" rotate the inputs of the named layers by a Hadamard
matrix (quant.rotate_inputs, qdiff.quant.rotation); the last rows also quantize each token's
activations in groups of 16 or 8 channels (quant.act_group_size), with and without the
rotations, and with 8-bit weights (what the weights still cost once activations are
grouped). Every student answers the teacher's questions along the same teacher
trajectories (16 videos, the recipe's 20 steps and guidance of the stock pipeline, its
denoiser calls recorded with `qdiff.walk.record_calls`), and the row reports the squared
error of its raw velocity -- the conditional and null branches as the pipeline asks for
them, no longer their guided combination -- relative to the teacher's, per step. The noisy first
half of the trajectory decides what the video shows; the last steps have small
velocities, so their relative error is large and matters little.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

import qdiff
from eval.common.report import ROOT, results_dir, write_json, write_markdown
from eval.common.walk import calls_by_step, student_answer
from qdiff.config import LayerOverride, load_config
from qdiff.distill.batches import trajectory_batch
from qdiff.distill.loop import build_student
from qdiff.families import family_for
from qdiff.walk import record_calls

RESULTS = results_dir("video")
NUM_VIDEOS, SEED = 16, 1234
FFN_IN, QKV, FFN_OUT, ATTN_OUT = "*ffn.net.0.proj", "*attn1.to_[qkv]", "*ffn.net.2", "*attn1.to_out.0"


class Row(NamedTuple):
    weight_bits: int
    act_bits: int
    four_bit_group: str | None  # the one layer group whose activations get 4 bits
    rotated: list[str]  # the layers whose inputs are rotated
    act_group_size: int = 0  # quant.act_group_size


ROWS: dict[str, Row] = {
    "W4A4": Row(4, 4, None, []),
    "W8A4": Row(8, 4, None, []),
    "W4A8": Row(4, 8, None, []),
    "W4A8, A4 at self-attention q/k/v": Row(4, 8, QKV, []),
    "W4A8, A4 at self-attention out": Row(4, 8, ATTN_OUT, []),
    "W4A8, A4 at cross-attention": Row(4, 8, "*attn2.*", []),
    "W4A8, A4 at FFN in": Row(4, 8, FFN_IN, []),
    "W4A8, A4 at FFN out": Row(4, 8, FFN_OUT, []),
    "W4A8, A4 at self-attention q/k/v, rotated": Row(4, 8, QKV, [QKV]),
    "W4A8, A4 at FFN in, rotated": Row(4, 8, FFN_IN, [FFN_IN]),
    "W4A8, A4 at FFN out, rotated": Row(4, 8, FFN_OUT, [FFN_OUT]),
    "W4A8, A4 at self-attention out, rotated": Row(4, 8, ATTN_OUT, [ATTN_OUT]),
    "W4A4, FFN in and self-attention q/k/v rotated": Row(4, 4, None, [FFN_IN, QKV]),
    "W4A4, FFN in, self-attention q/k/v and out rotated": Row(4, 4, None, [FFN_IN, QKV, ATTN_OUT]),
    "W4A4, FFN in and self-attention q/k/v rotated, activations in groups of 16":
        Row(4, 4, None, [FFN_IN, QKV], act_group_size=16),
    "W4A4, activations in groups of 16, none rotated": Row(4, 4, None, [], act_group_size=16),
    "W8A4, FFN in and self-attention q/k/v rotated, activations in groups of 16":
        Row(8, 4, None, [FFN_IN, QKV], act_group_size=16),
    "W4A4, FFN in and self-attention q/k/v rotated, activations in groups of 8":
        Row(4, 4, None, [FFN_IN, QKV], act_group_size=8),
}


def teacher_calls(family, guidance: float, steps: int) -> list:
    """The teacher's denoiser calls of the stock pipeline on the 16 videos, grouped by step."""
    labels, generators = trajectory_batch(SEED, 0, NUM_VIDEOS, family.num_conditions)
    with torch.no_grad():
        _, calls = record_calls(family.pipe, family.call_kwargs(labels, generators, steps, guidance))
    return calls_by_step(calls)


def relative_errors(family, student: torch.nn.Module, steps_calls: list) -> list[float]:
    """Per step: |student - teacher|^2 / |teacher|^2 of the raw velocity of the step's calls
    (both guidance branches), on the teacher's path."""
    errors = []
    with torch.no_grad():
        for calls in steps_calls:
            error = total = 0.0
            for call in calls:
                answer = family.prediction(call.component,
                                           student_answer(family.pipe, student, call)).float()
                teacher = family.prediction(call.component, call.output).float()
                error += ((answer - teacher) ** 2).sum().item()
                total += (teacher ** 2).sum().item()
            errors.append(error / total)
    return errors


def main() -> None:
    recipe = load_config(ROOT / "configs" / "tiny-wan-w4a4.yaml", ["aux.enabled=false"])
    family = family_for(qdiff.load_pipeline(recipe.model.path), recipe.model)
    steps, guidance = recipe.distill.trajectory_steps, recipe.distill.guidance_scale
    steps_calls = teacher_calls(family, guidance, steps)
    rows = []
    for name, row in ROWS.items():
        overrides = [LayerOverride(row.four_bit_group, act_bits=4)] if row.four_bit_group else []
        quant = dataclasses.replace(recipe.quant, weight_bits=row.weight_bits, act_bits=row.act_bits,
                                    overrides=overrides + list(recipe.quant.overrides),
                                    rotate_inputs=row.rotated, act_group_size=row.act_group_size)
        student = build_student(family, dataclasses.replace(recipe, quant=quant)).model
        errors = relative_errors(family, student, steps_calls)
        rows.append({"name": name, "per_step": errors,
                     "first_half": sum(errors[:steps // 2]) / (steps // 2)})
        print(name, f"{rows[-1]['first_half']:.4f}", flush=True)
    write(rows, steps)


def write(rows: list[dict], steps: int) -> None:
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "video-error-budget.json", {"rows": rows})
    shown = [0, steps // 4, steps // 2, 3 * steps // 4, steps - 1]
    lines = ["# Where the W4A4 error of the embedded video teacher comes from", "",
             "Command: `python -m eval.video.error_budget`", "",
             f"Calibrated PTQ students of configs/tiny-wan-w4a4.yaml, {NUM_VIDEOS} teacher "
             f"trajectories of {steps} steps of the stock pipeline; squared error of the raw "
             "velocity (conditional and null branches, as the pipeline calls the denoiser) "
             "relative to the teacher's. Rows after the third keep every activation at 8 bits "
             "except one group of layers at 4. Cross-attention attends to one class token, "
             "so its softmax is 1 whatever the query: only the value path can carry error. "
             "`rotated`: those layers' inputs are multiplied by a Hadamard matrix before they "
             "are quantized (quant.rotate_inputs). `groups of 16`: each token's activations on one "
             "grid per 16 channels (quant.act_group_size); likewise of 8.", "",
             "| row | mean, first half | " + " | ".join(f"step {i}" for i in shown) + " |",
             "|---|---:|" + "---:|" * len(shown)]
    for row in rows:
        lines.append(f"| {row['name']} | {row['first_half']:.4f} | "
                     + " | ".join(f"{row['per_step'][i]:.3f}" for i in shown) + " |")
    write_markdown(RESULTS / "video-error-budget.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
