"""Post-training quantization baselines on the embedded teacher, side by side in one run.

    python -m eval.quality.ptq                  # FP, naive and calibrated PTQ at W8A8, W4A8, W4A4, W3A3

- naive PTQ: min-max weight ranges per output channel, one min-max activation range per
  layer for the whole trajectory;
- calibrated PTQ: Lp (p = 2.4) searched weight ranges per output channel, and an
  Lp-searched activation step size per timestep (temporal), from teacher trajectories.
Both keep the recipe's 8-bit layers (time embedding, conv_in, conv_out) and no LoRA.
Every row samples with the same seeds as the FP row; scores are in the digits feature
network's space against the real held-out digits, plus FID to the FP samples.
Writes eval/results/quality/ptq.md and ptq.json: the baseline every later method is compared with.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

import qdiff
from eval.common.report import results_dir, write_json, write_markdown
from qdiff.calibrate import calibrate
from qdiff.config import load_config
from qdiff.eval.evaluate import (
    Reference,
    held_out_digits_reference,
    reference_from_features,
    score,
)
from qdiff.eval.feature_nets import load_feature_net
from qdiff.eval.features import extract_features
from qdiff.eval.npz import from_uint8_nhwc
from qdiff.eval.sampling import SamplingSettings, generate
from qdiff.quant import quantize_

RESULTS = results_dir("quality")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BIT_WIDTHS = ("w8a8", "w4a8", "w4a4", "w3a3")
METRICS = ("accuracy", "fid", "sfid")


def ptq_student(pipe, recipe: str, naive: bool):
    """A PTQ copy of the teacher's UNet for `configs/tiny-ldm-<recipe>.yaml`."""
    config = load_config(CONFIGS / f"tiny-ldm-{recipe}.yaml")
    quant = replace(config.quant, split_concat_inputs=False)  # the baselines: one table per tensor
    if naive:
        quant = replace(quant, weight_init="minmax", act_init="minmax", act_per_timestep=False)
    student = copy.deepcopy(pipe.unet)
    quantize_(student, quant)
    calibrate(student, pipe, quant.calibration_samples, config.distill.trajectory_steps,
              config.distill.eta, config.distill.guidance_scale, seed=config.seed)
    return type(pipe)(**{**pipe.components, "unet": student})


def evaluate_row(pipe, settings, net, real: Reference, fp: Reference | None) -> tuple[dict, object]:
    images, labels = generate(pipe, settings)
    features = extract_features(net, from_uint8_nhwc(images))
    row = score(features, torch.as_tensor(labels), real, METRICS, class_logits=True)
    row["fid_to_fp"] = score(features, None, fp, ["fid"], False)["fid"] if fp else 0.0
    return row, features


def evaluate_teacher(pipe, settings) -> tuple[object, Reference, Reference, dict]:
    """The digits network, the real held-out reference, the FP samples as a reference for
    `FID to FP`, and the FP row: what every table of rows against the teacher starts with."""
    net, stats = load_feature_net("digits")
    real = held_out_digits_reference(net, stats)
    fp_row, fp_features = evaluate_row(pipe, settings, net, real, None)
    fp = reference_from_features("FP samples", fp_features)
    return net, real, fp, {"method": "FP (teacher)", "bits": "W32A32", **fp_row}


def teacher_setup(config: Path, num_samples: int) -> tuple:
    """(config, teacher pipeline, SamplingSettings of its eval section, digits net, real
    reference, FP reference, FP row) for the recipe `config`: where every quality script
    that scores students against the embedded teacher starts."""
    base = load_config(config)
    pipe = qdiff.load_pipeline(base.model.path)
    pipe.set_progress_bar_config(disable=True)
    settings = SamplingSettings(num_samples, base.eval.steps, base.eval.guidance_scale,
                                base.eval.seed, 250)
    return (base, pipe, settings, *evaluate_teacher(pipe, settings))


def sampling_note(settings: SamplingSettings) -> str:
    """How every row of a table against the teacher was sampled and scored."""
    return (f"{settings.num_samples} samples per row, {settings.steps} DDIM steps, guidance "
            f"{settings.guidance}, the FP row's seeds for every row; digits feature network; "
            f"`FID to FP` against the FP samples of the same seeds (noise floor in "
            f"[eval-noise.md](eval-noise.md)).")


def quality_cells(row: dict) -> str:
    """A row's class accuracy, FID, sFID and FID to FP as Markdown cells."""
    return (f"{row['accuracy']:.2%} | {row['fid']:.3f} | {row['sfid']:.3f} | "
            f"{row['fid_to_fp']:.3f}")


def write_report(rows: list[dict], settings: SamplingSettings, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "ptq.json", {"settings": vars(settings), "rows": rows})
    lines = ["# PTQ baselines on the embedded teacher", "", f"Command: `{command}`", "",
             f"{settings.num_samples} samples per row (classes balanced), {settings.steps} DDIM "
             f"steps, guidance {settings.guidance}, the same seeds for every row. Digits feature "
             f"network; FID/sFID against the real held-out digits; `FID to FP` against the FP "
             f"row's samples (same seeds). Calibration: the recipe's teacher trajectories "
             f"(configs/tiny-ldm-*.yaml). The noise floor of each metric is in "
             f"[eval-noise.md](eval-noise.md).", "",
             "| method | bits | class accuracy | FID | sFID | FID to FP |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['bits']} | {row['accuracy']:.2%} | "
                     f"{row['fid']:.3f} | {row['sfid']:.3f} | {row['fid_to_fp']:.3f} |")
    write_markdown(RESULTS / "ptq.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bits", default=",".join(BIT_WIDTHS))
    args = parser.parse_args(argv)
    base = load_config(CONFIGS / "tiny-ldm-w4a4.yaml")
    pipe = qdiff.load_pipeline(base.model.path)
    settings = SamplingSettings(args.num_samples, args.steps, base.eval.guidance_scale,
                                base.eval.seed, 250)
    net, real, fp, fp_row = evaluate_teacher(pipe, settings)
    rows = [fp_row]
    for recipe in args.bits.split(","):
        for naive in (True, False):
            student = ptq_student(pipe, recipe, naive)
            row, _ = evaluate_row(student, settings, net, real, fp)
            rows.append({"method": "naive PTQ" if naive else "calibrated PTQ",
                         "bits": recipe.upper(), **row})
            print(rows[-1], flush=True)
    write_report(rows, settings, shlex.join(["python", "-m", "eval.quality.ptq", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
