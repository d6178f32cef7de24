"""Data-free distillation against its starting point (calibrated PTQ), side by side in one run.

    python -m eval.quality.finetune                      # W4A8, W4A4, W3A3 recipes of configs/
    python -m eval.quality.finetune --ablation           # and, at W4A4, the steps from EfficientDM's objective
    python -m eval.quality.finetune --bits w4a4 --report finetune-no-split name=w4a4-no-split \
        quant.split_concat_inputs=false        # the W4A4 recipe without split inputs

For each recipe (configs/tiny-ldm-<bits>.yaml): calibrated PTQ (Lp-searched weight ranges,
activation step sizes per tensor and timestep), the PTQ student distillation starts from
when the recipe sets other weight ranges or splits concatenated inputs, and the distilled student after `distill.steps` steps, sampled
with the FP teacher's seeds and scored in the digits feature network's space: class
accuracy, FID/sFID against the real held-out digits, and FID to the FP samples (same
seeds), whose noise floor is in eval-noise.md. `gap closed` = how much of calibrated
PTQ's FID-to-FP distillation removes. Writes eval/results/quality/finetune.md and .json (or
--report's name).

Every distilled row now matches each denoiser call of the stock pipeline as it was made
(the conditional and null branches, batched), as `qdiff.distill.loss.call_loss` does: the
guided-combination target and `distill.loss=update` are gone, so the ablation's first row
("noise MSE") is EfficientDM's path and weighting, not its guided target; reports written
before the pipeline walked matched the guided noise there.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

from eval.common.report import markdown_head, results_dir, write_json, write_markdown
from eval.quality.ptq import evaluate_row, quality_cells, sampling_note, teacher_setup
from qdiff.config import load_config
from qdiff.distill.loop import build_student, distill
from qdiff.eval.sampling import SamplingSettings

RESULTS = results_dir("quality")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _with_unet(pipe, unet):
    return type(pipe)(**{**pipe.components, "unet": unet})


# From EfficientDM's objective to qdiff's, one change at a time (the recipe's W4A4 otherwise).
EFFICIENTDM_INIT = ["quant.weight_init=mse", "quant.lp_norm=2.4", "lora.rank=8",
                    "quant.split_concat_inputs=false"]
ABLATION = {
    "EfficientDM objective: noise MSE on the teacher's 50-step eta-1 path":
        ["distill.loss=mse", "distill.walker=teacher", "distill.trajectory_steps=50",
         "distill.eta=1.0", *EFFICIENTDM_INIT],
    "+ the sampling path (20 steps, eta 0)":
        ["distill.loss=mse", "distill.walker=teacher", *EFFICIENTDM_INIT],
    "+ x0 loss": ["distill.walker=teacher", *EFFICIENTDM_INIT],
    "+ student walker": EFFICIENTDM_INIT,
    "+ min-max weight ranges": ["lora.rank=8", "quant.split_concat_inputs=false"],
    "+ split concatenated inputs": ["lora.rank=8"],
}
# The baseline: weights by an Lp search of clipping ratios, activations per tensor
# and timestep (one step size for a concatenated input too). The recipe's input rotations
# stay: they are a fixed transform of PTQ's, not something distillation learns.
CALIBRATED_PTQ = ["quant.weight_init=mse", "quant.lp_norm=2.4", "quant.split_concat_inputs=false"]


def start_label(cfg) -> str:
    """How the PTQ student distillation starts from differs from calibrated PTQ ('' if not)."""
    changes = [f"{cfg.quant.weight_init} weight ranges" if cfg.quant.weight_init != "mse" else "",
               "split concatenated inputs" if cfg.quant.split_concat_inputs else ""]
    return ", ".join(change for change in changes if change)


def distilled_row(pipe, cfg, method: str, settings, net, real, fp, ptq: dict) -> dict:
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run, not a resumed one
    start = time.time()
    student = distill(pipe, cfg, cfg.run_dir)
    minutes = (time.time() - start) / 60
    tuned, _ = evaluate_row(_with_unet(pipe, student), settings, net, real, fp)
    closed = 1 - tuned["fid_to_fp"] / ptq["fid_to_fp"] if ptq["fid_to_fp"] > 0 else 0.0
    return {"method": method, "bits": f"W{cfg.quant.weight_bits}A{cfg.quant.act_bits}",
            "distill_min": round(minutes, 1), "gap_closed": closed,
            **tuned}


def run_recipe(pipe, recipe: str, settings, net, real, fp, overrides: list[str],
               ablation: bool) -> list[dict]:
    def config(*extra: str):
        return load_config(CONFIGS / f"tiny-ldm-{recipe}.yaml",
                           ["output_dir=runs/bench-finetune", "export.enabled=false", *extra,
                            *overrides])

    cfg = config()
    ptq, _ = evaluate_row(_with_unet(pipe, build_student(pipe, config(*CALIBRATED_PTQ)).model),
                          settings, net, real, fp)
    rows = [{"method": "calibrated PTQ", "bits": recipe.upper(), **ptq}]
    if start_label(cfg):  # distillation starts from another PTQ: show it too
        start, _ = evaluate_row(_with_unet(pipe, build_student(pipe, cfg).model), settings, net,
                                real, fp)
        rows.append({"method": f"PTQ, {start_label(cfg)} (qdiff's start)", "bits": recipe.upper(),
                     **start})
    variants = ABLATION.items() if ablation and recipe == "w4a4" else []
    for name, extra in variants:
        rows.append(distilled_row(pipe, config(*extra, f"name=ablation-{len(rows)}"), name,
                                  settings, net, real, fp, ptq))
        print(rows[-1], flush=True)
    rows.append(distilled_row(pipe, cfg, f"qdiff ({cfg.distill.steps} steps)", settings, net,
                              real, fp, ptq))
    return rows


def write_report(rows: list[dict], settings: SamplingSettings, command: str, report: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{report}.json", {"settings": vars(settings), "rows": rows})
    lines = markdown_head(
        "Distillation vs calibrated PTQ on the embedded teacher", command,
        sampling_note(settings) + " `gap closed`: 1 - FID to FP of qdiff / of calibrated PTQ. "
        "Rows between PTQ and qdiff (with `--ablation`) change EfficientDM's objective into "
        "qdiff's one step at a time; each starts from PTQ calibrated on its own trajectories.")
    lines += ["| method | bits | class accuracy | FID | sFID | FID to FP | gap closed | distill min |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        closed = f"{row['gap_closed']:.0%}" if "gap_closed" in row else ""
        lines.append(f"| {row['method']} | {row['bits']} | {quality_cells(row)} | {closed} | "
                     f"{row.get('distill_min', '')} |")
    write_markdown(RESULTS / f"{report}.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default="w4a8,w4a4,w3a3")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--ablation", action="store_true",
                        help="at W4A4, also distil with EfficientDM's objective, changed step by step")
    parser.add_argument("--report", default="finetune",
                        help="write eval/results/REPORT.md and .json (a variant need not replace the table)")
    parser.add_argument("overrides", nargs="*", help="key=value for every recipe")
    args = parser.parse_args(argv)
    _, pipe, settings, net, real, fp, fp_row = teacher_setup(CONFIGS / "tiny-ldm-w4a4.yaml",
                                                             args.num_samples)
    rows = [fp_row]
    for recipe in args.bits.split(","):
        rows += run_recipe(pipe, recipe, settings, net, real, fp, args.overrides, args.ablation)
        print(rows[-1], flush=True)
        write_report(rows, settings, shlex.join(["python", "-m", "eval.quality.finetune", *sys.argv[1:]]),
                     args.report)


if __name__ == "__main__":
    main()
