"""The portable export (`export.format: torchao`) against the native one, on the embedded teacher.

    python -m qdiff.finetune configs/tiny-ldm-w4a8-torchao.yaml    # the runs it reads (else it
    python -m qdiff.finetune configs/tiny-ldm-w8a8-torchao.yaml    #  runs them itself)
    python -m eval.quality.portable      # -> eval/results/quality/portable.md and .json

For each recipe (configs/tiny-ldm-<bits>-torchao.yaml: per-token activations at clip ratio
1, no split or rotated inputs, the recipe's other settings) the run's student is exported
both ways, and each export is loaded back as its users would load it:

- native: `export.format: qdiff` (written beside the run's export, in `export-qdiff/`),
  loaded with `qdiff.load_pipeline`: qdiff's integer layers, every layer as trained;
- portable: the run's own `export/` (torchao), loaded with `dtype=torch.float32`:
  stock diffusers' UNet with torchao int8 Linear layers; convolutions (torchao has none in
  int8) and Linear layers whose 8-bit codes do not fit int8 are float layers holding the
  student's dequantized weights, with float inputs.

The student is the run's last checkpoint (no training here). Each row samples with the FP
teacher's seeds and is scored as eval.quality.finetune scores (class accuracy, FID/sFID to
the real held-out digits, FID to the FP samples). Sizes are the denoiser folders' bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

import qdiff
from eval.common.report import command_line, markdown_head, results_dir, write_json, write_markdown
from eval.quality.ptq import evaluate_row, quality_cells, sampling_note, teacher_setup
from eval.speed.export import folder_bytes
from qdiff.config import RunConfig, load_config
from qdiff.distill.checkpoint import latest_checkpoint
from qdiff.distill.loop import distill
from qdiff.eval.sampling import SamplingSettings
from qdiff.export import export_pipeline
from qdiff.export.torchao_format import RECORD_KEY
from qdiff.finetune import finetune

RESULTS = results_dir("quality")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = ("w4a8", "w8a8")


def finished_run(cfg: RunConfig) -> Path:
    """The run folder of `cfg` with its export, distilled here first if it has none."""
    if not (cfg.run_dir / "export" / "qdiff_manifest.json").is_file():
        finetune(cfg, resume=latest_checkpoint(cfg.run_dir) is not None)
    return cfg.run_dir


def exports(pipe, cfg: RunConfig) -> dict[str, Path]:
    """The run's portable export and a native export of the same student, by form."""
    run_dir = finished_run(cfg)
    native = run_dir / "export-qdiff"
    if not (native / "qdiff_manifest.json").is_file():
        shutil.rmtree(native, ignore_errors=True)
        student = distill(pipe, cfg, run_dir, resume=True)  # the last checkpoint, no step left
        export_pipeline(pipe, student, native, cfg.quant, format="qdiff")
    return {"native (qdiff)": native, "portable (torchao)": run_dir / "export"}


def load(folder: Path, form: str):
    pipe = qdiff.load_pipeline(folder, **({"dtype": torch.float32} if "torchao" in form else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def layer_counts(unet_dir: Path) -> str:
    """'int8 / float' quantized layers of a portable export ('' for a native one)."""
    record = json.loads((unet_dir / "config.json").read_text()).get(RECORD_KEY)
    if record is None:
        return ""
    return f"{len(record['int8_layers'])} / {len(record['float_layers'])}"


def run_recipe(pipe, recipe: str, settings, net, real, fp, teacher_bytes: int) -> list[dict]:
    cfg = load_config(CONFIGS / f"tiny-ldm-{recipe}-torchao.yaml")
    rows = []
    for form, folder in exports(pipe, cfg).items():
        row, _ = evaluate_row(load(folder, form), settings, net, real, fp)
        size = folder_bytes(folder / "unet")
        rows.append({"method": form, "bits": recipe.upper(), "config": f"configs/tiny-ldm-{recipe}-torchao.yaml",
                     "denoiser_bytes": size, "size_vs_float32": size / teacher_bytes,
                     "int8_float_layers": layer_counts(folder / "unet"), **row})
        print(rows[-1], flush=True)
    return rows


def write_report(rows: list[dict], settings: SamplingSettings, command: str) -> None:
    write_json(RESULTS / "portable.json", {"settings": vars(settings), "rows": rows}, command)
    lines = markdown_head(
        "The portable export (torchao) against the native export, embedded teacher", command,
        sampling_note(settings) + " Each recipe's one student (`configs/tiny-ldm-<bits>-torchao.yaml`, "
        "1000 distillation steps) exported both ways: `native` is qdiff's integer model; "
        "`portable` is stock diffusers with torchao int8 Linear layers (dynamic per-token int8 "
        "inputs) and float convolutions holding the student's dequantized weights. `int8 / "
        "float`: the portable form's quantized layers by kind. Size: the denoiser folder "
        "against the teacher's float32 one.")
    lines += ["| export | bits | class accuracy | FID | sFID | FID to FP | denoiser size | vs float32 "
              "| int8 / float |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        size = f"{row['denoiser_bytes'] / 2**20:.2f} MiB" if "denoiser_bytes" in row else ""
        ratio = f"{row['size_vs_float32']:.2f}x" if "size_vs_float32" in row else ""
        lines.append(f"| {row['method']} | {row['bits']} | {quality_cells(row)} | {size} | {ratio} | "
                     f"{row.get('int8_float_layers', '')} |")
    write_markdown(RESULTS / "portable.md", "\n".join(lines) + "\n", command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", default=",".join(RECIPES))
    parser.add_argument("--num-samples", type=int, default=1000)
    args = parser.parse_args(argv)
    base, pipe, settings, net, real, fp, fp_row = teacher_setup(
        CONFIGS / "tiny-ldm-w4a8-torchao.yaml", args.num_samples)
    teacher_bytes = folder_bytes(Path(base.model.path) / "unet")
    rows = [{**fp_row, "denoiser_bytes": teacher_bytes, "size_vs_float32": 1.0}]
    for recipe in args.bits.split(","):
        rows += run_recipe(pipe, recipe, settings, net, real, fp, teacher_bytes)
        write_report(rows, settings, command_line())


if __name__ == "__main__":
    main()
