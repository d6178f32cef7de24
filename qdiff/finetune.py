"""`python -m qdiff.finetune CONFIG [key=value ...]`: data-free distillation, then export.

    python -m qdiff.finetune configs/tiny-ldm-w4a4.yaml
    python -m qdiff.finetune configs/tiny-ldm-w4a4.yaml distill.steps=200 --resume
    accelerate launch -m qdiff.finetune configs/tiny-ldm-w4a4.yaml      # several processes

The run lives in `<output_dir>/<name>/` (default `runs/<config name>/`): the resolved
config, `log.jsonl`, `checkpoints/`, `samples/` (teacher vs student grids) and, at the
end, `export/` -- the low-bit pipeline that `qdiff.load_pipeline` loads.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from qdiff.config import ConfigError, RunConfig, load_config
from qdiff.distill.checkpoint import latest_checkpoint
from qdiff.distill.loop import NonFiniteLossError, distill, mean_recent_loss
from qdiff.export import ExportMismatchError, check_export, export_pipeline, quantized_class_for
from qdiff.families import family_for
from qdiff.models.loading import load_pipeline

logger = logging.getLogger("qdiff.finetune")


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Create the run directory; refuse to silently mix a new run into an old one."""
    run_dir = cfg.run_dir
    if latest_checkpoint(run_dir) is not None and not (resume or overwrite):
        raise ConfigError(f"{run_dir} already holds checkpoints of a run. Pass --resume to "
                          f"continue it, --overwrite to start again, or name=<new name>.")
    if overwrite:
        for old in ("checkpoints", "log.jsonl", "samples", "export"):
            path = run_dir / old
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def finetune(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Distil `cfg.model.path` into a low-bit student; returns the run directory."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo on CPU-only hosts
    run_dir = prepare_run_dir(cfg, resume, overwrite) if accelerator.is_main_process else cfg.run_dir
    accelerator.wait_for_everyone()
    start = time.time()
    pipe = load_pipeline(cfg.model.path)
    pipe.set_progress_bar_config(disable=True)
    family = family_for(pipe, cfg.model)
    family.cast_teacher(getattr(torch, cfg.model.dtype))
    pipe.to(accelerator.device)
    student = distill(family, cfg, run_dir, resume=resume, accelerator=accelerator)
    if accelerator.is_main_process:
        export_dir = _export(family, student, cfg, run_dir)
        logger.info("done in %.1f min: %d steps, mean loss of the last 50 %.4g%s",
                    (time.time() - start) / 60, cfg.distill.steps, mean_recent_loss(run_dir),
                    f", export in {export_dir}" if export_dir else "")
    return run_dir


def _export(family, student: nn.Module, cfg: RunConfig, run_dir: Path) -> Path | None:
    """Export the student. The written denoiser is loaded back and each integer layer checked
    against its student layer (`check_export`) before the folder is renamed into place, so
    an export that does not compute what was trained is never left to be found."""
    if not cfg.export.enabled:
        return None

    def check(folder: Path) -> None:
        exported = quantized_class_for(student).from_pretrained(folder / family.denoiser_name)
        errors = check_export(family, student, exported.to(family.pipe.device),
                              cfg.distill.guidance_scale)
        logger.info("export checked: %d integer layers reproduce the student, worst relative "
                    "error %.2g", len(errors), max(errors.values(), default=0.0))

    out_dir = Path(cfg.export.dir or run_dir / "export")
    return export_pipeline(family.pipe, student, out_dir, cfg.quant, check=check)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qdiff.finetune",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a YAML file, e.g. configs/tiny-ldm-w4a4.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. distill.steps=200")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run of this name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        finetune(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, FileNotFoundError, NonFiniteLossError, ExportMismatchError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
