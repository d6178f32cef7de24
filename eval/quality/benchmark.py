"""qdiff against PTQ and full QAT on the embedded teacher, every row in one run.

    python -m eval.quality                 # 5 methods x W8A8, W4A8, W4A4, W3A3 (~2.5 h on 2 cores)
    python -m eval.quality --bits w4a4     # one bit width (~40 min)
    python -m eval.quality --quick         # smoke run: few samples and steps -> benchmark-quick.*

Methods, each from the bit width's recipe (configs/tiny-ldm-<bits>.yaml):
- naive PTQ: min-max weight ranges, one min-max activation range for all timesteps;
- calibrated PTQ: Lp (p = 2.4) searched weight ranges, an activation step size per timestep;
- full QAT: LSQ on all weights -- the base weights themselves trained (no LoRA), on the
  same trajectories, loss and number of steps as qdiff (`distill.base_weight_lr`);
- qdiff: QALoRA + temporal LSQ + scale-aware learning rates (the recipe as it is);
- qdiff + Phi: and QVGen's auxiliary branches, removed by rank decay during the run.

Every row samples with the FP teacher's seeds and is scored in the digits feature
network's space against the real held-out digits (accuracy, FID, sFID, IS, precision,
recall) and against the FP samples (FID to FP). Cost columns: fine-tuning wall time, its
peak resident memory above the process's before the student was built, trainable
parameters, the exported denoiser's bytes, and the exported pipeline's sampling time over
the FP pipeline's (same batch, taking turns). Quality numbers repeat exactly for the same
seeds and thread count on CPU. Writes benchmark.md/.json, benchmark-quality.png (quality
against bits), benchmark-training.png (loss against wall time) and benchmark-samples.png.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

import qdiff
from eval.common.memory import peak_bytes, settle
from eval.common.plotting import require_matplotlib
from eval.common.report import results_dir, write_json, write_markdown
from eval.quality.ptq import BIT_WIDTHS, CONFIGS
from qdiff.config import load_config
from qdiff.distill.loop import build_student, distill
from qdiff.eval.evaluate import (
    held_out_digits_reference,
    reference_from_features,
    score,
)
from qdiff.eval.feature_nets import load_feature_net
from qdiff.eval.features import extract_features
from qdiff.eval.npz import from_uint8_nhwc
from qdiff.eval.sampling import SamplingSettings, generate
from qdiff.export import export_pipeline

RESULTS = results_dir("quality")
METRICS = ("accuracy", "fid", "sfid", "is", "precision", "recall")
NOISE = RESULTS / "eval-noise.json"

# name -> (trained?, overrides of the recipe)
METHODS: dict[str, tuple[bool, list[str]]] = {
    "naive PTQ": (False, ["quant.weight_init=minmax", "quant.act_init=minmax",
                          "quant.act_per_timestep=false"]),
    "calibrated PTQ": (False, ["quant.weight_init=mse", "quant.lp_norm=2.4"]),
    "full QAT": (True, ["lora.enabled=false", "distill.base_weight_lr=1e-5"]),
    "qdiff": (True, []),
    "qdiff + Phi": (True, ["aux.enabled=true", "aux.rank=8", "aux.phase_steps=100"]),
}
QUICK = ["distill.steps=40", "quant.calibration_samples=4", "distill.checkpoint_every=20"]


# ---------------------------------------------------------------- memory of this process

# ---------------------------------------------------------------- one row

def build(pipe, cfg, trained: bool) -> tuple[torch.nn.Module, dict]:
    """The student of one row and its training costs (zero for PTQ)."""
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run, not a resumed one
    trainable = sum(p.numel() for p in build_student(pipe, cfg, calibrated=False).model.parameters()
                    if p.requires_grad) if trained else 0
    base = settle()
    start = time.perf_counter()
    student = distill(pipe, cfg, cfg.run_dir) if trained else build_student(pipe, cfg).model
    return student, {"train_s": time.perf_counter() - start if trained else 0.0,
                     "peak_mb": (peak_bytes() - base) / 1e6 if trained else 0.0,
                     "trainable_params": trainable}


def sampling_ratio(fp_pipe, low_pipe, repeats: int) -> float:
    """Median over repeats of (exported pipeline's time / FP pipeline's) on one batch of 20."""
    def seconds(pipe) -> float:
        start = time.perf_counter()
        pipe(class_labels=list(range(10)) * 2, guidance_scale=2.0, num_inference_steps=20,
             generator=torch.Generator().manual_seed(0), output_type="np")
        return time.perf_counter() - start
    for pipe in (fp_pipe, low_pipe):
        pipe.set_progress_bar_config(disable=True)
        seconds(pipe)  # warm-up (and the integer kernels' one-time preparation)
    return statistics.median(seconds(low_pipe) / seconds(fp_pipe) for _ in range(repeats))


def exported(pipe, student, cfg, folder: Path) -> tuple[int, object]:
    export_pipeline(pipe, student, folder, cfg.quant)
    size = sum(path.stat().st_size for path in (folder / "unet").iterdir() if path.is_file())
    return size, qdiff.load_pipeline(folder)


def evaluate(pipe, settings, net, real, fp) -> tuple[dict, torch.Tensor, object]:
    """Scores of `pipe`'s samples (FID to FP too, given `fp`), its first 20 images, features."""
    images, labels = generate(pipe, settings)
    features = extract_features(net, from_uint8_nhwc(images))
    row = score(features, torch.as_tensor(labels), real, METRICS, class_logits=True)
    row["fid_to_fp"] = score(features, None, fp, ["fid"], False)["fid"] if fp else 0.0
    return row, from_uint8_nhwc(images[:20]), features


def teacher_row(pipe, settings) -> tuple[tuple, dict, torch.Tensor]:
    """(feature net, real reference, FP-samples reference), the FP row and its images."""
    net, stats = load_feature_net("digits")
    real = held_out_digits_reference(net, stats)
    row, images, features = evaluate(pipe, settings, net, real, None)
    reference = (net, real, reference_from_features("FP samples", features))
    return reference, {"method": "FP (teacher)", "bits": "W32A32", **row}, images


def run_row(pipe, bits: str, method: str, settings, reference, workdir: Path, extra: list[str],
            repeats: int) -> tuple[dict, torch.Tensor]:
    trained, overrides = METHODS[method]
    name = f"bench-{bits}-{method.replace(' ', '').replace('+', '-')}"
    cfg = load_config(CONFIGS / f"tiny-ldm-{bits}.yaml",
                      ["output_dir=runs", f"name={name}", "export.enabled=false",
                       "distill.sample_every=100000", *overrides, *extra])
    student, costs = build(pipe, cfg, trained)
    size, low_pipe = exported(pipe, student, cfg, workdir / name)
    scores, images, _ = evaluate(type(pipe)(**{**pipe.components, "unet": student}), settings,
                                 *reference)
    row = {"method": method, "bits": bits.upper(), **scores, **costs, "export_bytes": size,
           "sampling_vs_fp": sampling_ratio(pipe, low_pipe, repeats),
           "log": str(cfg.run_dir / "log.jsonl") if trained else None}
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row, images


# ---------------------------------------------------------------- report

def noise_floor() -> float:
    """Largest FID between two FP sample sets of disjoint seeds (eval/quality/noise.py)."""
    pairs = json.loads(NOISE.read_text())["pairs"]
    return max(pair["fid"] for pair in pairs)


def write_table(rows: list[dict], settings: SamplingSettings, command: str, suffix: str) -> None:
    floor = noise_floor()
    lines = ["# qdiff against PTQ and full QAT on the embedded teacher", "",
             f"Command: `{command}`", "",
             f"{settings.num_samples} samples per row, {settings.steps} DDIM steps, guidance "
             f"{settings.guidance}, the FP row's seeds for every row; digits feature network. "
             f"Noise floor of FID (two FP sample sets, disjoint seeds): {floor:.2f} "
             f"([eval-noise.md](eval-noise.md)). `train`: fine-tuning wall time; `peak MB`: its "
             f"peak resident memory above the process's before the student was built; "
             f"`sampling`: the exported pipeline's sampling time / the FP pipeline's.", "",
             "| method | bits | accuracy | FID | sFID | IS | precision | recall | FID to FP | "
             "train | peak MB | trainable | export KB | sampling |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cost = (f"{r['train_s'] / 60:.1f} min | {r['peak_mb']:.0f} | {r['trainable_params'] / 1e6:.2f} M"
                if r.get("train_s") else " | | ")
        export = (f"{r['export_bytes'] / 1e3:,.0f} | {r['sampling_vs_fp']:.2f}x"
                  if "export_bytes" in r else " | ")
        lines.append(f"| {r['method']} | {r['bits']} | {r['accuracy']:.1%} | {r['fid']:.3f} | "
                     f"{r['sfid']:.2f} | {r['is']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r.get('fid_to_fp', 0.0):.3f} | {cost} | {export} |")
    lines += ["", f"![quality against bits](benchmark{suffix}-quality.png)",
              f"![training loss against wall time](benchmark{suffix}-training.png)",
              f"![samples, one row per table row](benchmark{suffix}-samples.png)"]
    write_markdown(RESULTS / f"benchmark{suffix}.md", "\n".join(lines) + "\n")
    write_json(RESULTS / f"benchmark{suffix}.json", {"command": command, "settings": vars(settings),
                                                      "noise_floor_fid": floor, "rows": rows})


def plot_quality(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bits = [b.upper() for b in BIT_WIDTHS if any(r["bits"] == b.upper() for r in rows)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        points = {r["bits"]: r["fid_to_fp"] for r in rows if r["method"] == method}
        ax.plot(bits, [points.get(b, float("nan")) for b in bits], marker="o", label=method)
    ax.axhline(noise_floor(), color="grey", linestyle=":", label="noise floor")
    ax.set(yscale="log", xlabel="bits", ylabel="FID to FP (digits features)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    trained = [r for r in rows if r.get("log")]
    bits = sorted({r["bits"] for r in trained}, key=[b.upper() for b in BIT_WIDTHS].index)
    fig, axes = plt.subplots(1, len(bits), figsize=(4 * len(bits), 3.2), squeeze=False)
    for ax, bit in zip(axes[0], bits):
        for r in (r for r in trained if r["bits"] == bit):
            log = [json.loads(line) for line in Path(r["log"]).read_text().splitlines()]
            bins: dict[int, list[dict]] = {}
            for entry in log:  # means over 100 steps: whole trajectories, so every t weighs alike
                bins.setdefault((entry["step"] - 1) // 100, []).append(entry)
            ax.plot([statistics.mean(e["elapsed_s"] for e in b) / 60 for b in bins.values()],
                    [statistics.mean(e["loss"] for e in b) for b in bins.values()],
                    marker=".", label=r["method"])
        ax.set(title=bit, xlabel="wall time (min)", ylabel="loss", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default=",".join(BIT_WIDTHS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="64 samples, 40 training steps, W4A4")
    args = parser.parse_args(argv)
    bit_widths = ["w4a4"] if args.quick else args.bits.split(",")
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS] + [b for b in bit_widths if b not in BIT_WIDTHS]
    if unknown:
        parser.error(f"unknown {unknown}; methods: {list(METHODS)}, bits: {list(BIT_WIDTHS)}")
    require_matplotlib("python -m eval.quality")
    suffix, extra = ("-quick", QUICK) if args.quick else ("", [])
    base = load_config(CONFIGS / "tiny-ldm-w4a4.yaml")
    pipe = qdiff.load_pipeline(base.model.path)
    pipe.set_progress_bar_config(disable=True)
    settings = SamplingSettings(64 if args.quick else args.num_samples, base.eval.steps,
                                base.eval.guidance_scale, base.eval.seed, 250)
    reference, fp_row, fp_images = teacher_row(pipe, settings)
    rows, grids = [fp_row], [fp_images]
    command = shlex.join(["python", "-m", "eval.quality", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="qdiff-bench-") as tmp:
        for bits in bit_widths:
            for method in methods:
                row, images = run_row(pipe, bits, method, settings, reference, Path(tmp),
                                      extra, repeats=1 if args.quick else 3)
                rows.append(row)
                grids.append(images)
                write_table(rows, settings, command, suffix)  # a crash keeps the rows so far
    plot_quality(rows, RESULTS / f"benchmark{suffix}-quality.png")
    plot_training(rows, RESULTS / f"benchmark{suffix}-training.png")
    save_image(torch.cat(grids), RESULTS / f"benchmark{suffix}-samples.png", nrow=20, padding=1)
    print((RESULTS / f"benchmark{suffix}.md").read_text())


if __name__ == "__main__":
    main()
