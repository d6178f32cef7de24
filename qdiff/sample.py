"""Sample any family's pipeline into a PNG grid: one row per class or prompt line.

    python -m qdiff.sample                                   # the embedded teacher
    python -m qdiff.sample --pipeline runs/x/export --steps 50 --out grid.png
    python -m qdiff.sample --pipeline runs/sd/export --prompts prompts.txt --per-class 4
    python -m qdiff.sample --pipeline runs/wan/export --prompts prompts.txt --size 17,256,256

Conditions are class ids (`--classes`, default: the family's preview, e.g. 0..9) or, for a
prompt family, the first 10 lines of `--prompts FILE` (default: a run export's own
model.prompts). Each sample draws its noise from a generator of its own, seeded (seed, j).
A video is one tile with its frames side by side.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import save_image

from qdiff.cli import (
    add_debug_flag,
    check_steps,
    component_config,
    nonnegative_float,
    nonnegative_int,
    pipeline_folder,
    positive_int,
    run_main,
    sample_size,
    writable_output,
)
from qdiff.eval.sampling import (ConditionError, check_classes, check_conditions,
                                  family_class_of_index, family_of)
from qdiff.models.loading import load_pipeline

logger = logging.getLogger("qdiff.sample")


def _class_list(text: str) -> list[int]:
    try:
        classes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        classes = []
    if not classes or min(classes) < 0:
        raise argparse.ArgumentTypeError(f"takes comma-separated class ids (0 or more), e.g. "
                                         f"3,5; got '{text}'")
    return classes


def _image_path(text: str) -> Path:
    """An output path whose suffix PIL can write (checked before any sampling)."""
    path = Path(text)
    Image.init()
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        what = f"is a '{path.suffix}' file, which PIL cannot write" if path.suffix \
            else "has no image suffix"
        raise argparse.ArgumentTypeError(f"'{text}' {what}; end the name in .png "
                                         f"(or .jpg, .webp)")
    return path


def _run_model(pipeline: str):
    """The `model` block of the run a run export belongs to (None for another pipeline)."""
    from qdiff.config import load_config

    run_config = Path(pipeline).parent / "config.yaml"
    return load_config(run_config).model if run_config.is_file() else None


def conditions_of(args: argparse.Namespace) -> tuple[str | None, tuple[int, ...] | None]:
    """--prompts and --size, else a run export's own model.prompts and sample size."""
    prompts, size = args.prompts, args.size
    model = _run_model(args.pipeline)
    if model is not None:
        prompts = prompts or model.prompts
        size = size or model.video_size or model.image_size
    return prompts, size


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse a pipeline, conditions, step count or output that cannot work, before loading."""
    index = pipeline_folder(args.pipeline)
    writable_output(args.out)
    prompts, _ = conditions_of(args)
    check_conditions(family_class_of_index(index), args.pipeline, prompts,
                     classes=args.classes)
    num_classes = component_config(args.pipeline, "class_embedder").get("num_classes")
    if num_classes is not None and args.classes is not None:
        check_classes(args.classes, num_classes, args.pipeline)
    check_steps(args.pipeline, args.steps)


def sample_grid(pipeline_path: str, classes: list[int] | None, per_class: int, steps: int,
                guidance: float, seed: int, out: Path, prompts: str | None = None,
                size: tuple[int, ...] | None = None, batch_size: int | None = None) -> Path:
    """Generate `per_class` samples of each condition (class ids `classes`, default the
    family's preview; for a prompt family the first lines of `prompts`), sample j from
    generator (seed, j), and save them as a grid: a row per condition, a video's frames
    side by side."""
    from qdiff.distill.samples import sample_images

    pipe = load_pipeline(pipeline_path)
    family = family_of(pipe, prompts, size, str(pipeline_path))
    if family.conditions == "classes":
        if classes is not None:
            check_classes(classes, family.num_conditions, pipeline_path)
        conditions = torch.tensor(classes) if classes is not None else family.preview_conditions()
    else:
        if classes is not None:
            raise ConditionError(f"--classes: --pipeline {pipeline_path} is a {family.name} "
                                 f"pipeline, conditioned on prompts, not class ids; give "
                                 f"--prompts FILE instead.")
        conditions = family.preview_conditions()
    ids = conditions.repeat_interleave(per_class)
    pipe.set_progress_bar_config(desc=f"sampling {len(ids)} {'videos' if family.video else 'images'}")
    images = sample_images(family, None, ids, steps, guidance, seed, batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, out, nrow=per_class, padding=1)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m qdiff.sample",
        description="Sample a qdiff pipeline (any family) into a grid: a row per class or "
                    "prompt line, a video's frames side by side.")
    parser.add_argument("--pipeline", default="assets/tiny-ldm-digits",
                        help="pipeline folder (teacher or export)")
    parser.add_argument("--classes", type=_class_list, default=None,
                        help="class families: comma-separated class ids, a row each "
                             "(default: the family's preview, e.g. 0..9)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="prompt families: a text file, one prompt per line; its first 10 "
                             "lines are the rows (default: a run export's model.prompts)")
    parser.add_argument("--size", type=sample_size, default=None, metavar="[F,]H,W",
                        help="sample size: HEIGHT,WIDTH, or FRAMES,HEIGHT,WIDTH for a video "
                             "family (default: a run export's model size, else the pipeline's)")
    parser.add_argument("--per-class", type=positive_int, default=8,
                        help="samples of each class or prompt (the columns)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="samples per pipeline call (default: all at once); the images do "
                             "not depend on it")
    parser.add_argument("--steps", type=positive_int, default=20,
                        help="denoising steps of the pipeline's scheduler")
    parser.add_argument("--guidance", type=nonnegative_float, default=2.0,
                        help="classifier-free guidance")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--out", type=_image_path, default=Path("samples.png"),
                        help="image file (.png, .jpg, ...)")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_main(lambda: _run(args), args)


def _run(args: argparse.Namespace) -> None:
    check_inputs(args)
    start = time.time()
    prompts, size = conditions_of(args)
    path = sample_grid(args.pipeline, args.classes, args.per_class, args.steps, args.guidance,
                       args.seed, args.out, prompts, size, args.batch_size)
    logger.info("wrote %s (%s x %d samples, %d steps, guidance %.1f) in %.1fs",
                path, f"{len(args.classes)} classes" if args.classes else
                (f"prompts of {prompts}" if prompts else "the preview classes"),
                args.per_class, args.steps, args.guidance, time.time() - start)

if __name__ == "__main__":
    main()
