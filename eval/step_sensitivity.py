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
    scheduler = family.trajectory_scheduler(STEPS)
    labels = torch.arange(SAMPLES) % 10
    context = family.context(labels, GUIDANCE)
    latents = family.prepare_latents(SAMPLES, torch.Generator().manual_seed(7))
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, timestep)
        denoiser = student if index in student_steps else None
        noise = family.guided_noise(model_input, timestep, context, GUIDANCE, denoiser=denoiser)
        latents = scheduler.step(noise, timestep, latents, eta=0.0).prev_sample
    return family.pipe.decode_latents(latents)


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
