"""Data-free distillation against its starting point (calibrated PTQ), side by side in one run.

    python eval/finetune.py                      # W4A8, W4A4, W3A3 recipes of configs/

For each recipe (configs/tiny-ldm-<bits>.yaml): the calibrated PTQ student (where
distillation starts) and the distilled student after `distill.steps` steps, both sampled
with the FP teacher's seeds and scored in the digits feature network's space: class
accuracy, FID/sFID against the real held-out digits, and FID to the FP samples (same
seeds), whose noise floor is in eval-noise.md. `gap closed` = how much of the PTQ
student's FID-to-FP distillation removes. Writes eval/results/finetune.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import qdiff
from qdiff.config import load_config
from qdiff.distill.loop import build_student, distill
from qdiff.eval.evaluate import held_out_digits_reference, reference_from_features
from qdiff.eval.feature_nets import load_feature_net
from qdiff.eval.sampling import SamplingSettings

from ptq import evaluate_row  # noqa: E402  (eval/ is a folder of scripts)

RESULTS = Path(__file__).parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _with_unet(pipe, unet):
    return type(pipe)(**{**pipe.components, "unet": unet})


def run_recipe(pipe, recipe: str, settings, net, real, fp, overrides: list[str]) -> list[dict]:
    cfg = load_config(CONFIGS / f"tiny-ldm-{recipe}.yaml",
                      ["output_dir=runs/bench-finetune", "export.enabled=false", *overrides])
    ptq, _ = evaluate_row(_with_unet(pipe, build_student(pipe, cfg).model), settings, net, real, fp)
    start = time.time()
    student = distill(pipe, cfg, cfg.run_dir)
    minutes = (time.time() - start) / 60
    tuned, _ = evaluate_row(_with_unet(pipe, student), settings, net, real, fp)
    closed = 1 - tuned["fid_to_fp"] / ptq["fid_to_fp"] if ptq["fid_to_fp"] > 0 else 0.0
    return [{"method": "calibrated PTQ", "bits": recipe.upper(), **ptq},
            {"method": f"qdiff ({cfg.distill.steps} steps)", "bits": recipe.upper(),
             "distill_min": round(minutes, 1), "gap_closed": closed, **tuned}]


def write_report(rows: list[dict], settings: SamplingSettings, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps({"settings": vars(settings), "rows": rows},
                                                      indent=2) + "\n")
    lines = ["# Distillation vs calibrated PTQ on the embedded teacher", "",
             f"Command: `{command}`", "",
             f"{settings.num_samples} samples per row, {settings.steps} DDIM steps, guidance "
             f"{settings.guidance}, the FP row's seeds for every row; digits feature network. "
             f"`FID to FP`: against the FP samples of the same seeds (noise floor in "
             f"[eval-noise.md](eval-noise.md)); `gap closed`: 1 - FID to FP of qdiff / of PTQ.", "",
             "| method | bits | class accuracy | FID | sFID | FID to FP | gap closed | distill min |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        closed = f"{row['gap_closed']:.0%}" if "gap_closed" in row else ""
        lines.append(f"| {row['method']} | {row['bits']} | {row['accuracy']:.2%} | {row['fid']:.3f} "
                     f"| {row['sfid']:.3f} | {row['fid_to_fp']:.3f} | {closed} | "
                     f"{row.get('distill_min', '')} |")
    (RESULTS / "finetune.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="w4a8,w4a4,w3a3")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("overrides", nargs="*", help="key=value for every recipe")
    args = parser.parse_args(argv)
    base = load_config(CONFIGS / "tiny-ldm-w4a4.yaml")
    pipe = qdiff.load_pipeline(base.model.path)
    pipe.set_progress_bar_config(disable=True)
    settings = SamplingSettings(args.num_samples, base.eval.steps, base.eval.guidance_scale,
                                base.eval.seed, 250)
    net, stats = load_feature_net("digits")
    real = held_out_digits_reference(net, stats)
    fp_row, fp_features = evaluate_row(pipe, settings, net, real, None)
    rows = [{"method": "FP (teacher)", "bits": "W32A32", **fp_row}]
    fp = reference_from_features("FP samples", fp_features)
    for recipe in args.bits.split(","):
        rows += run_recipe(pipe, recipe, settings, net, real, fp, args.overrides)
        print(rows[-2:], flush=True)
        write_report(rows, settings, "python " + " ".join(["eval/finetune.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
