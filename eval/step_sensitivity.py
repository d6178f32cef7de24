"""Which denoising steps' errors matter: the W4A4 PTQ student in one block of steps only.

    python eval/step_sensitivity.py          # -> eval/results/step-sensitivity.md

Samples 300 images (20 DDIM steps, guidance 2) where the calibrated W4A4 student predicts
the noise in one block of steps and the FP teacher in all others, from the same noise as
the teacher's own samples, and reports their distance to the teacher's samples: per-sample
squared distance of the digits network's pooled features and pixel MSE. This is why
`distill.loss: x0` weights the noisy start most: its errors decide the image.
"""

from __future__ import annotations

from pathlib import Path

import torch

import qdiff
from qdiff.config import load_config
from qdiff.distill.loop import build_student
from qdiff.distill.trajectory import TrajectoryWalk
from qdiff.eval.feature_nets import load_feature_net
from qdiff.eval.features import extract_features
from qdiff.families import family_for

RESULTS = Path(__file__).parent / "results"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-ldm-w4a4.yaml"
STEPS, GUIDANCE, SAMPLES = 20, 2.0, 300
BLOCKS = {"all 20": range(20), "0-4 (noisiest)": range(5), "5-9": range(5, 10),
          "10-14": range(10, 15), "15-19 (cleanest)": range(15, 20), "0 only": range(1),
          "19 only": range(19, 20)}


@torch.no_grad()
def sample(family, student, student_steps: range) -> torch.Tensor:
    """Deterministic DDIM from fixed noise; the student answers in `student_steps` only."""
    labels = torch.arange(SAMPLES) % 10
    walk = TrajectoryWalk(family, labels, STEPS, 0.0, GUIDANCE, torch.Generator().manual_seed(7))
    while not walk.done:
        point = walk.point()
        noise = point.teacher_output
        if point.index in student_steps:
            noise = family.guided_noise(point.model_input, point.timestep, point.context,
                                        GUIDANCE, denoiser=student)
        walk.advance(noise)
    return family.decode(walk.latents)


def main() -> None:
    cfg = load_config(CONFIG)
    pipe = qdiff.load_pipeline(cfg.model.path)
    family = family_for(pipe, cfg.model)
    student = build_student(family, cfg).model
    net, _ = load_feature_net("digits")
    teacher_images = sample(family, student, range(0))
    teacher_features = extract_features(net, teacher_images).pool
    lines = ["# Which steps' errors matter (W4A4 PTQ student on the embedded teacher)", "",
             "Command: `python eval/step_sensitivity.py`", "", __doc__.split("\n\n")[1].replace(
                 "\n", " "), "",
             "| student predicts in steps | feature distance | share of all | pixel MSE |",
             "|---|---:|---:|---:|"]
    total = None
    for name, block in BLOCKS.items():
        images = sample(family, student, block)
        distance = float(((extract_features(net, images).pool - teacher_features) ** 2)
                         .sum(1).mean())
        total = total or distance
        pixel = float(((images - teacher_images) ** 2).mean())
        lines.append(f"| {name} | {distance:.3f} | {distance / total:.0%} | {pixel:.5f} |")
        print(lines[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step-sensitivity.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
