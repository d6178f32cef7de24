"""Is a recipe change bigger than the spread between training runs? Several seeds per variant.

    python -m eval.quality.seed_spread                     # the W4A4 recipe with and without split inputs
    python -m eval.quality.seed_spread --seeds 1,2,3 --variant "rank 8=lora.rank=8"

One distilled student's FID to FP moves by about 0.05 from run to run: the run's seed
draws LoRA's initialisation, the calibration and training trajectories, and on CPU the
thread count changes the order of float sums, which the chaotic sampling path amplifies.
So a single run per recipe cannot tell changes of that size apart. This trains
configs/tiny-ldm-w4a4.yaml once per (variant, seed) -- `--parallel` runs at a time, one
thread each, which on 2 cores finishes two runs in about the time of one 2-thread run --
then scores every student as eval/quality/finetune.py does (1000 samples, the FP row's seeds,
FID to the FP samples) and reports each variant's mean and range. A run that keeps a moving
average (`distill.ema_decay`) is scored twice, its average and its last step's weights: the
same training, so their difference is the average's alone.
Writes eval/results/quality/seed-spread.md and .json (or --report's name). The runs of Nov 2026
(seed-spread*.md) are kept for the research log in docs/notes/studies-2026-11/quality/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import qdiff
from eval.common.report import ROOT, results_dir, write_json, write_markdown
from eval.quality.ptq import evaluate_row, evaluate_teacher
from eval.quality.step_sensitivity import distilled_student
from qdiff.config import load_config
from qdiff.distill.checkpoint import latest_checkpoint
from qdiff.distill.ema import EMA_FILE
from qdiff.eval.sampling import SamplingSettings
from qdiff.families import family_for

RESULTS = results_dir("quality")
CONFIG = ROOT / "configs" / "tiny-ldm-w4a4.yaml"
OUTPUT = ROOT / "runs" / "bench-spread"
DEFAULT_VARIANTS = ["recipe (split concatenated inputs)=",
                    "one step size per tensor=quant.split_concat_inputs=false"]


def parse_variant(text: str) -> tuple[str, list[str]]:
    """'label=key=value,key=value' -> (label, overrides); 'label=' is the recipe itself."""
    label, _, overrides = text.partition("=")
    if not label:
        raise SystemExit(f"--variant {text!r}: write it as 'label=key=value,...' (or 'label=').")
    return label, [item for item in overrides.split(",") if item]


def train_all(jobs: list[tuple[str, list[str]]], parallel: int) -> None:
    """Run `python -m qdiff.finetune` for every (name, overrides), `parallel` at a time, 1 thread each."""
    OUTPUT.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            name, overrides = pending.pop(0)
            log = open(OUTPUT / f"{name}.log", "w")
            command = [sys.executable, "-m", "qdiff.finetune", str(CONFIG), *overrides, "--overwrite"]
            running.append((name, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT), log, time.time()))
            print(f"training {name}: {' '.join(overrides)}", flush=True)
        time.sleep(5)
        for job in [job for job in running if job[1].poll() is not None]:
            name, process, log, started = job
            log.close()
            running.remove(job)
            if process.returncode:
                raise SystemExit(f"{name} failed (exit {process.returncode}); see {OUTPUT / name}.log")
            print(f"{name} done in {(time.time() - started) / 60:.1f} min", flush=True)


def summary(rows: list[dict], labels: list[str]) -> list[str]:
    lines = ["| variant | runs | FID to FP mean | min | max | class accuracy (mean) |",
             "|---|---:|---:|---:|---:|---:|"]
    for label in labels:
        values = [row["fid_to_fp"] for row in rows if row["variant"] == label]
        accuracy = sum(row["accuracy"] for row in rows if row["variant"] == label) / len(values)
        lines.append(f"| {label} | {len(values)} | {sum(values) / len(values):.3f} | "
                     f"{min(values):.3f} | {max(values):.3f} | {accuracy:.2%} |")
    return lines


def write_report(rows: list[dict], labels: list[str], settings: SamplingSettings, command: str,
                 report: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / f"{report}.json", {"settings": vars(settings), "rows": rows})
    lines = ["# Run-to-run spread of the distilled W4A4 student", "", f"Command: `{command}`", "",
             f"configs/tiny-ldm-w4a4.yaml, one distillation per (variant, seed), each on one thread; "
             f"{settings.num_samples} samples per student, {settings.steps} DDIM steps, guidance "
             f"{settings.guidance}, the FP samples' seeds; `FID to FP` against those FP samples "
             f"(digits feature network).", "", *summary(rows, labels), "",
             "| variant | seed | class accuracy | FID | FID to FP | loss of the last step (a trajectory's last denoising step) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['seed']} | {r['accuracy']:.2%} | {r['fid']:.3f} | "
              f"{r['fid_to_fp']:.3f} | {r['loss']:.5f} |" for r in rows]
    write_markdown(RESULTS / f"{report}.md", "\n".join(lines) + "\n")


def last_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return next(record["loss"] for record in reversed(records) if "loss" in record)


def students_of(run_dir: Path) -> list[bool]:
    """`averaged` for each student of a run: [True, False] where it keeps an average."""
    return [True, False] if (latest_checkpoint(run_dir) / EMA_FILE).is_file() else [True]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--variant", action="append", help="'label=key=value,...' (repeatable)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--report", default="seed-spread",
                        help="name of the eval/results/<report>.md and .json to write")
    args = parser.parse_args()
    variants = [parse_variant(text) for text in args.variant or DEFAULT_VARIANTS]
    seeds = [int(seed) for seed in args.seeds.split(",")]
    jobs = {(label, seed): (f"v{index}-seed{seed}",
                            [f"output_dir={OUTPUT}", f"name=v{index}-seed{seed}", f"seed={seed}",
                             "export.enabled=false", "distill.sample_every=100000", *overrides])
            for index, (label, overrides) in enumerate(variants) for seed in seeds}
    train_all(list(jobs.values()), args.parallel)

    base = load_config(CONFIG)
    pipe = qdiff.load_pipeline(ROOT / base.model.path)
    pipe.set_progress_bar_config(disable=True)
    settings = SamplingSettings(args.num_samples, base.eval.steps, base.eval.guidance_scale,
                                base.eval.seed, 250)
    net, real, fp, _ = evaluate_teacher(pipe, settings)
    family = family_for(pipe, base.model)
    rows, labels = [], [label for label, _ in variants]
    for (label, seed), (name, _) in jobs.items():
        for averaged in students_of(OUTPUT / name):
            student, _ = distilled_student(family, OUTPUT / name, averaged)
            scores, _ = evaluate_row(type(pipe)(**{**pipe.components, "unet": student}), settings,
                                     net, real, fp)
            row_label = label if averaged else f"{label}, last step's weights"
            labels += [row_label] if row_label not in labels else []
            rows.append({"variant": row_label, "seed": seed, "loss": last_loss(OUTPUT / name),
                         **scores})
            print(rows[-1], flush=True)
    write_report(rows, labels, settings,
                 shlex.join(["python", "-m", "eval.quality.seed_spread", *sys.argv[1:]]), args.report)


if __name__ == "__main__":
    main()
