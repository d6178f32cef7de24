"""`python -m qdiff.finetune CONFIG [key=value ...]`: data-free distillation, then export.

    python -m qdiff.finetune configs/tiny-ldm-w4a4.yaml
    python -m qdiff.finetune configs/tiny-ldm-w4a4.yaml distill.steps=2000 --resume
    accelerate launch -m qdiff.finetune configs/tiny-ldm-w4a4.yaml      # several processes

The run lives in `<output_dir>/<name>/` (default `runs/<config name>/`): the resolved
config, `log.jsonl`, `checkpoints/`, `samples/` (teacher vs student grids) and, at the
end, `export/` -- the low-bit pipeline that `qdiff.load_pipeline` loads.

The run folder is a transaction (`qdiff.distill.run_dir`):

- One run at a time: the folder is locked while a run uses it; a second run into it is
  refused, naming the other's pid. The lock ends with its process, however it ends.
- A folder that holds a run is refused unless `--resume` (continue it) or `--overwrite`
  (start again). `--overwrite` sets the previous run aside and deletes it only once the new
  run has loaded its teacher and calibrated its student; if set-up fails (a wrong
  `model.path`, Ctrl-C), the previous run is put back as it was.
- `--resume` continues from the newest checkpoint, and the log keeps only the steps up to
  it. It refuses a config that would train a different student (listing `key: old -> new`);
  what it may change is `qdiff.distill.run_dir.RESUMABLE_CHANGES` (more steps, how often
  to checkpoint, eval and export settings). `--allow-config-change` resumes anyway, and
  says so in the log.
- Each run first removes what killed runs left: unfinished checkpoints and export folders.
- A run that diverges (`distill.divergence_factor`) or whose quantizer tables stop being
  numbers stops, names its last good checkpoint, and exports nothing.

Exit status: 0 done; 2 a failure the user can fix, printed as one line `error: ...`
(a bad config, a busy or unwritable folder, a diverged run, a full disk); 130 Ctrl-C,
with one line naming the last checkpoint and the command that resumes from it. `--debug`
(or QDIFF_DEBUG=1) shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from qdiff.cli import add_debug_flag, run_main
from qdiff.config import RunConfig, load_config
from qdiff.distill.checkpoint import latest_checkpoint
from qdiff.calibrate import by_component
from qdiff.distill.loop import distill, mean_recent_loss, teacher_family
from qdiff.distill.run_dir import open_run_folder
from qdiff.export import check_export, export_pipeline, quantized_class_for
from qdiff.families import Family
from qdiff.models.loading import load_pipeline

logger = logging.getLogger("qdiff.finetune")


def finetune(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
             allow_config_change: bool = False,
             on_started: Callable[[], None] | None = None) -> Path:
    """Distil `cfg.model.path` into a low-bit student; returns the run directory.

    The main process holds the run folder (`open_run_folder`: lock, litter, `--overwrite`
    set aside until set-up has passed, `--resume`'s config check) for the whole run.
    `on_started` is called once the run has passed set-up (and deleted a previous run)."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo on CPU-only hosts
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        _run(cfg, cfg.run_dir, accelerator, resume, None)
        return cfg.run_dir
    with open_run_folder(cfg, resume, overwrite, allow_config_change) as folder:
        accelerator.wait_for_everyone()

        def started() -> None:
            folder.commit()
            if on_started is not None:
                on_started()

        _run(cfg, folder.path, accelerator, resume, started)
    return folder.path


def _run(cfg: RunConfig, run_dir: Path, accelerator: Accelerator, resume: bool,
         started: Callable[[], None] | None) -> None:
    start = time.time()
    pipe = load_pipeline(cfg.model.path)
    pipe.set_progress_bar_config(disable=True)
    family = teacher_family(pipe, cfg)
    family.cast_teacher(getattr(torch, cfg.model.dtype))
    pipe.to(accelerator.device)
    student = distill(family, cfg, run_dir, resume=resume, accelerator=accelerator,
                      on_setup_done=started)
    if accelerator.is_main_process:
        export_dir = _export(family, student, cfg, run_dir)
        logger.info("done in %.1f min: %d steps, mean loss of the last 50 %.4g%s",
                    (time.time() - start) / 60, cfg.distill.steps, mean_recent_loss(run_dir),
                    f", export in {export_dir}" if export_dir else "")


def _export(family: Family, student: nn.Module, cfg: RunConfig, run_dir: Path) -> Path | None:
    """Export the students. The written denoisers are loaded back and each integer layer
    checked against its student layer (`check_export`) before the folder is renamed into
    place, so an export that does not compute what was trained is never left to be found."""
    if not cfg.export.enabled:
        return None
    students = by_component(student, family)

    def check(folder: Path) -> None:
        if cfg.export.format == "torchao":  # stock classes: check that each loads back
            for component, model in students.items():
                type(model).from_pretrained(folder / component, dtype=model.dtype)
            return
        exported = {component: quantized_class_for(model).from_pretrained(folder / component)
                    .to(family.pipe.device) for component, model in students.items()}
        errors = check_export(family, students, exported, cfg.distill.guidance_scale)
        logger.info("export checked: %d integer layers reproduce the student, worst relative "
                    "error %.2g", len(errors), max(errors.values(), default=0.0))

    out_dir = Path(cfg.export.dir or run_dir / "export")
    return export_pipeline(family.pipe, students, out_dir, cfg.quant, check=check,
                           format=cfg.export.format)


def resume_hint(run_dir: Path, config: Path, overrides: Sequence[str],
                overwrite_pending: bool = False) -> str:
    """What Ctrl-C prints: the checkpoint a resume starts from and the command that does;
    before an `--overwrite` has started, that the previous run is as it was."""
    command = ["python", "-m", "qdiff.finetune", str(config), *overrides]
    if overwrite_pending:
        return (f"the previous run in {run_dir} is as it was; start again with: "
                f"{shlex.join([*command, '--overwrite'])}")
    command = shlex.join([*command, "--resume"])
    last = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    where = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
    return f"{where}; continue with: {command}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qdiff.finetune",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a YAML file, e.g. configs/tiny-ldm-w4a4.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. distill.steps=200")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start the run again; the previous one is deleted once this one "
                             "has started")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume even where the config changes the student")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_dir: list[Path] = []
    started: list[bool] = []

    def body() -> None:
        cfg = load_config(args.config, args.overrides)
        run_dir.append(cfg.run_dir)
        finetune(cfg, resume=args.resume, overwrite=args.overwrite,
                 allow_config_change=args.allow_config_change,
                 on_started=lambda: started.append(True))

    def interrupted() -> str:
        if not run_dir:
            return "nothing was started; run the command again"
        return resume_hint(run_dir[0], args.config, args.overrides,
                           overwrite_pending=args.overwrite and not started)

    run_main(body, args, interrupted=interrupted)


if __name__ == "__main__":
    main()
