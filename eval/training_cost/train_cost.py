"""What fine-tuning costs at Stable Diffusion's size: full QAT against qdiff, per training step.

    python -m eval.training_cost            # SD-1.5's layout at half its UNet width (~50 min on 2 cores)
    python -m eval.training_cost --quick    # at a tenth of the width (smoke run)
    python -m eval.training_cost --normal-weights  # bell-shaped weights -> train-cost-normal.*

On the embedded teacher (2.5 M parameters) qdiff is not cheaper than full QAT
(benchmark.md): LoRA at rank 32 is nearly full rank for 32..64-channel layers, and the
activations, not the weights, fill the memory. Its saving is a property of large layers.
This measures it where it exists: configs/sd15-w4a4.yaml's distillation, a few steps on
the SD-1.5-shaped pipeline of eval/speed/speed.py (random weights, 256 x 256 images) with the
UNet at half width (`--width`, 220 M parameters: full QAT of the 860 M-parameter UNet
does not fit beside its teacher in this machine's 24 GB, it reached 23.9 GB while still
growing), once per method, each in a fresh process so that one method's freed memory
cannot hide another's peak. Quality is not measured: the weights are random.

- full QAT: LSQ on all weights, the base weights themselves trained (no LoRA);
- qdiff, float W0: QALoRA + temporal LSQ with the frozen base weight held in float32;
- qdiff, packed W0: the same with W0 held as packed 4-bit codes (the recipe's);
- gradient checkpointing (`distill.gradient_checkpointing=true`): each block's activations
  recomputed in the backward pass instead of kept. The ratio columns compare each row with
  full QAT at the same setting;
- low-rank backward (`lora.low_rank_backward=true distill.weight_scale_lr=0`): B and A get
  their gradients without the full weight gradient, and each layer keeps a byte per weight
  of codes and one of clipped mask for the backward pass instead of W0 + B A and W_q in
  float (qdiff/quant/lora_backward.py). Which layers take the low-rank way depends on how
  many weights the grid clips: diffusers' uniform init clips ~3%, so `--normal-weights`.

The teacher runs in float32 (the recipe's bfloat16 has no arithmetic on this CPU: 40x
slower, eval/results/speed/speed.md); one trajectory of `--steps` DDIM steps, batch 1 with
classifier-free guidance, calibration on one trajectory, min-max weight ranges (the
recipe's Lp search takes minutes per student at this size and trains nothing). Columns:
peak resident memory of the fine-tuning above the process with the teacher loaded,
median seconds per training step (the first excluded: allocation and kernel warm-up),
trainable parameters; the JSON also has each child's whole time (student build and
calibration included, which at this size take most of it).
Writes eval/results/training_cost/train-cost.md and .json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import qdiff
from eval.common.memory import peak_bytes, settle
from eval.common.report import ROOT, results_dir, write_json, write_markdown
from eval.speed.speed import build_sd
from qdiff.config import load_config
from qdiff.distill.loop import distill

RESULTS = results_dir("training_cost")
CONFIG = ROOT / "configs" / "sd15-w4a4.yaml"
FLOAT_W0 = ["quant.packed_base_weight=false"]
FULL_QAT = ["lora.enabled=false", "distill.base_weight_lr=1e-5", *FLOAT_W0]
CHECKPOINTING = ["distill.gradient_checkpointing=true"]
LOW_RANK = ["distill.weight_scale_lr=0", "lora.low_rank_backward=true"]
METHODS: dict[str, list[str]] = {
    "full QAT": FULL_QAT,
    "full QAT, gradient checkpointing": FULL_QAT + CHECKPOINTING,
    "qdiff, float W0": FLOAT_W0,
    "qdiff, float W0, gradient checkpointing": FLOAT_W0 + CHECKPOINTING,
    "qdiff, packed W0 (the recipe), gradient checkpointing": CHECKPOINTING,
    "qdiff, float W0, low-rank backward": FLOAT_W0 + LOW_RANK,
    "qdiff, packed W0, low-rank backward": LOW_RANK,
    "qdiff, packed W0, low-rank backward, gradient checkpointing": LOW_RANK + CHECKPOINTING,
}


def full_qat_row(method: str) -> str:
    """The full QAT row that `method` is compared with: the one with its checkpointing."""
    checkpointed = CHECKPOINTING[0] in METHODS[method]
    return "full QAT, gradient checkpointing" if checkpointed else "full QAT"


@torch.no_grad()
def redraw_normal(model: torch.nn.Module) -> None:
    """Every weight of two or more dimensions redrawn from N(0, its own std).

    diffusers initialises Linear and Conv weights uniformly, so about 3% of each row sits
    within half a step of a min-max grid's top end, where the rounded zero point clips
    it; trained weights are bell-shaped, with few weights near their row's extremes."""
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("weight") and param.dim() >= 2:
            param.copy_(torch.randn(param.shape, generator=generator) * param.std())


def run_config(pipe_dir: Path, run_dir: Path, steps: int, overrides: list[str]):
    return load_config(CONFIG, [
        f"model.path={pipe_dir}", "model.dtype=float32", f"output_dir={run_dir.parent}",
        f"name={run_dir.name}", f"distill.steps={steps}", f"distill.trajectory_steps={steps}",
        "distill.batch_size=1", "quant.calibration_samples=1", "distill.log_every=1",
        "quant.weight_init=minmax",  # the recipe's Lp search takes minutes per student here
        f"distill.checkpoint_every={steps}", "distill.sample_every=100000", "export.enabled=false",
        "eval.steps=1",  # the end-of-run sample grid: not what is measured
        *overrides])


def measure(pipe_dir: Path, run_dir: Path, steps: int, method: str) -> dict:
    """One method's costs, in this process (the child of `main`)."""
    pipe = qdiff.load_pipeline(pipe_dir)
    cfg = run_config(pipe_dir, run_dir, steps, METHODS[method])
    base = settle()
    start = time.perf_counter()
    student = distill(pipe, cfg, run_dir)
    total = time.perf_counter() - start
    peak = peak_bytes() - base
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    elapsed = [record["elapsed_s"] for record in records if "loss" in record]
    per_step = [after - before for before, after in zip(elapsed, elapsed[1:])]
    return {"method": method, "peak_mb": peak / 1e6, "step_s": statistics.median(per_step),
            "total_s": total, "trainable_params": trainable}


def in_fresh_process(pipe_dir: Path, run_dir: Path, steps: int, method: str, threads: int) -> dict:
    out = run_dir.with_suffix(".json")
    command = [sys.executable, "-m", "eval.training_cost.train_cost", "--child", method, "--pipe", str(pipe_dir),
               "--run-dir", str(run_dir), "--steps", str(steps), "--threads", str(threads),
               "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)  # the recipe's prompt file
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def report(rows: list[dict], describe: str, command: str, suffix: str) -> None:
    by_method = {r["method"]: r for r in rows}
    lines = ["# Fine-tuning cost at Stable Diffusion's size: full QAT against qdiff", "",
             f"Command: `{command}`", "", describe, "",
             "| method | peak MB | vs full QAT | s / step | vs full QAT | trainable |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        qat = by_method[full_qat_row(r["method"])]
        lines.append(f"| {r['method']} | {r['peak_mb']:,.0f} | {r['peak_mb'] / qat['peak_mb']:.2f}x | "
                     f"{r['step_s']:.1f} | {r['step_s'] / qat['step_s']:.2f}x | "
                     f"{r['trainable_params'] / 1e6:.1f} M |")
    RESULTS.mkdir(exist_ok=True)
    write_markdown(RESULTS / f"train-cost{suffix}.md", "\n".join(lines) + "\n")
    write_json(RESULTS / f"train-cost{suffix}.json", {"command": command, "describe": describe, "rows": rows})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of SD's width")
    parser.add_argument("--width", type=float, default=0.5, help="the UNet's width over SD-1.5's")
    parser.add_argument("--steps", type=int, default=6, help="training steps per method")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--normal-weights", action="store_true",
                        help="redraw every weight matrix and kernel from a normal distribution "
                             "(bell-shaped like trained weights) -> train-cost-normal.*")
    parser.add_argument("--methods", default=";".join(METHODS),
                        help="rows of METHODS, separated by ';' (with the full QAT rows they compare to)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pipe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [name.strip() for name in args.methods.split(";")]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    baselines = {full_qat_row(name) for name in methods}
    if not baselines <= set(methods):
        raise SystemExit(f"--methods: the ratios need {sorted(baselines - set(methods))} too")
    if args.child:
        args.out.write_text(json.dumps(measure(args.pipe, args.run_dir, args.steps, args.child)))
        return
    with tempfile.TemporaryDirectory(prefix="qdiff-train-cost-") as tmp:
        workdir = Path(tmp)
        pipe = build_sd(args.quick, args.width)
        unet_params = sum(p.numel() for p in pipe.unet.parameters())
        if args.normal_weights:
            redraw_normal(pipe.unet)
        pipe.save_pretrained(workdir / "sd")
        del pipe
        rows = []
        for index, method in enumerate(methods):
            rows.append(in_fresh_process(workdir / "sd", workdir / f"run-{index}", args.steps, method,
                                         args.threads))
            print(rows[-1], flush=True)
    describe = (f"SD-1.5-shaped pipeline, UNet at {args.width:g}x{' a tenth of' if args.quick else ''} "
                f"SD-1.5's width ({unet_params / 1e6:.0f} M parameters, random weights"
                f"{', every matrix and kernel normal' if args.normal_weights else ''}), configs/sd15-w4a4.yaml "
                f"with the teacher in float32, one trajectory of {args.steps} steps, batch 1 with "
                f"guidance, min-max weight ranges; {args.threads} thread(s), torch {torch.__version__}. `peak MB`: peak "
                f"resident memory of the fine-tuning (student build, calibration, training, the last "
                f"checkpoint and sample grid) above the process with the teacher loaded; `s / step`: "
                f"median over the steps after the first; ratios against full QAT with the same "
                f"gradient checkpointing setting.")
    command = shlex.join(["python", "-m", "eval.training_cost", *(argv if argv is not None else sys.argv[1:])])
    suffix = ("-quick" if args.quick else "") + ("-normal" if args.normal_weights else "")
    report(rows, describe, command, suffix)
    print((RESULTS / f"train-cost{suffix}.md").read_text())


if __name__ == "__main__":
    main()
