"""Which denoising steps' errors matter: the W4A4 student in one block of steps only.

    python -m eval.quality.step_sensitivity                             # the PTQ student
    python -m eval.quality.step_sensitivity --run runs/tiny-ldm-w4a4    # and a distilled one

Samples 300 images (20 DDIM steps, guidance 2) where the calibrated W4A4 student predicts
the noise in one block of steps (its raw output, both guidance branches, as the stock
pipeline calls it) and the FP teacher in all others, from the same noise as the
teacher's own samples, and reports their distance to the teacher's samples: per-sample
squared distance of the digits network's pooled features and pixel MSE. This is why
`distill.loss: x0` weights the noisy start most: its errors decide the image.

With `--run`, the same for the student of a distillation run (its last checkpoint) beside
the PTQ student it started from: which steps' errors distillation removed, and which it
left.

A last table finds the layers behind the error of the late steps (10-19): W4A8 PTQ
students (4-bit PTQ weights, which distillation repairs) with one group of layers'
activations at 4 bits, the student answering in those steps only.
Writes eval/results/quality/step-sensitivity.md.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import qdiff
from eval.common.report import results_dir, write_markdown
from eval.common.walk import sample_with_students_in_steps
from qdiff.config import LayerOverride, load_config
from qdiff.distill.checkpoint import latest_checkpoint
from qdiff.distill.loop import build_student, student_at
from qdiff.eval.feature_nets import load_feature_net
from qdiff.eval.features import extract_features
from qdiff.families import family_for

RESULTS = results_dir("quality")
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-ldm-w4a4.yaml"
STEPS, GUIDANCE, SAMPLES = 20, 2.0, 300
BLOCKS = {"all 20": range(20), "0-4 (noisiest)": range(5), "5-9": range(5, 10),
          "10-14": range(10, 15), "15-19 (cleanest)": range(15, 20), "0 only": range(1),
          "19 only": range(19, 20)}
LATE = range(10, 20)
# row -> (activation bits of every layer, the one group (fnmatch) whose activations get 4)
LATE_ROWS: dict[str, tuple[int, str | None]] = {
    "W4A8": (8, None),
    "W4A4": (4, None),
    "W4A8, A4 at resnet conv1": (8, "*resnets.*.conv1"),
    "W4A8, A4 at resnet conv2": (8, "*resnets.*.conv2"),
    "W4A8, A4 at the up blocks' resnet shortcut (input: the skip concatenation)":
        (8, "up_blocks.*.conv_shortcut"),
    "W4A8, A4 at feed-forward in": (8, "*.ff.net.0.proj"),
    "W4A8, A4 at feed-forward out": (8, "*.ff.net.2"),
    "W4A8, A4 at attention q/k/v/out": (8, "*.attn[12].to_*"),
    "W4A8, A4 at transformer proj_in/proj_out": (8, "*attentions.*.proj_*"),
}


@torch.no_grad()
def sample(family, student, student_steps: range) -> torch.Tensor:
    """Deterministic DDIM of the stock pipeline from fixed noise; the student answers the
    denoiser calls of `student_steps` only (both guidance branches), the teacher all others."""
    labels = torch.arange(SAMPLES) % 10
    kwargs = family.call_kwargs(labels, torch.Generator().manual_seed(7), STEPS, GUIDANCE,
                                output_type="pt")
    if student is None:
        return family.to_images(family.pipe(**kwargs))
    students = {family.denoisers[0]: student}
    return family.to_images(sample_with_students_in_steps(family.pipe, students, kwargs,
                                                          lambda step: step in student_steps))


def distilled_student(family, run_dir: Path, averaged: bool = True) -> tuple[torch.nn.Module, Path]:
    """The student of `run_dir` at its last checkpoint, built from the run's own config (with
    `averaged=False`, the last step's weights of a run that keeps an average)."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise SystemExit(f"{run_dir} has no checkpoint: run `python -m qdiff.finetune "
                         f"configs/tiny-ldm-w4a4.yaml` first, or pass its run directory.")
    return student_at(family, load_config(run_dir / "config.yaml"), checkpoint, averaged), checkpoint


def feature_distance(net, images: torch.Tensor, teacher_features: torch.Tensor) -> float:
    """Mean per-sample squared distance of the digits network's pooled features."""
    return float(((extract_features(net, images).pool - teacher_features) ** 2).sum(1).mean())


def distances(family, student, net, teacher_images, teacher_features) -> dict[str, tuple]:
    """Per block: (feature distance, pixel MSE) of the samples to the teacher's."""
    found = {}
    for name, block in BLOCKS.items():
        images = sample(family, student, block)
        feature = feature_distance(net, images, teacher_features)
        found[name] = (feature, float(((images - teacher_images) ** 2).mean()))
        print(name, found[name], flush=True)
    return found


def table(ptq: dict[str, tuple], distilled: dict[str, tuple] | None) -> list[str]:
    header = "| student predicts in steps | feature distance | share of all | pixel MSE |"
    if distilled is not None:
        header += " distilled: feature distance | share of all | distilled / PTQ |"
    lines = [header, "|---" + "|---:" * (header.count("|") - 2) + "|"]
    for name, (feature, pixel) in ptq.items():
        line = f"| {name} | {feature:.3f} | {feature / ptq['all 20'][0]:.0%} | {pixel:.5f} |"
        if distilled is not None:
            tuned = distilled[name][0]
            line += f" {tuned:.3f} | {tuned / distilled['all 20'][0]:.0%} | {tuned / feature:.2f} |"
        lines.append(line)
    return lines


def late_step_rows(family, cfg, net, teacher_images, teacher_features) -> list[str]:
    """Feature distance when the student answers in steps 10-19 only, per LATE_ROWS row."""
    lines = ["| student (calibrated PTQ) | feature distance, steps 10-19 |", "|---|---:|"]
    for name, (act_bits, four_bit_group) in LATE_ROWS.items():
        overrides = [LayerOverride(four_bit_group, act_bits=4)] if four_bit_group else []
        quant = dataclasses.replace(cfg.quant, act_bits=act_bits,
                                    overrides=overrides + list(cfg.quant.overrides))
        student = build_student(family, dataclasses.replace(cfg, quant=quant)).model
        images = sample(family, student, LATE)
        feature = feature_distance(net, images, teacher_features)
        lines.append(f"| {name} | {feature:.3f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a distillation run directory to compare")
    args = parser.parse_args()
    cfg = load_config(CONFIG)
    pipe = qdiff.load_pipeline(cfg.model.path)
    family = family_for(pipe, cfg.model)
    net, _ = load_feature_net("digits")
    teacher_images = sample(family, None, range(0))
    teacher_features = extract_features(net, teacher_images).pool
    reference = (net, teacher_images, teacher_features)
    ptq = distances(family, build_student(family, cfg).model, *reference)
    distilled, command, source = None, "python -m eval.quality.step_sensitivity", []
    if args.run is not None:
        student, checkpoint = distilled_student(family, args.run)
        distilled = distances(family, student, *reference)
        command += f" --run {args.run}"
        source = [f"Distilled student: `{checkpoint}`.", ""]
    about = [paragraph.strip().replace("\n", " ") for paragraph in __doc__.split("\n\n")[2:]]
    lines = ["# Which steps' errors matter (W4A4 students on the embedded teacher)", "",
             f"Command: `{command}`", "", *"\n\n".join(about).split("\n"), "", *source,
             *table(ptq, distilled), "", "## Which layers' 4-bit activations make the late steps' error",
             "", *late_step_rows(family, cfg, *reference)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_markdown(RESULTS / "step-sensitivity.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
