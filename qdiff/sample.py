"""Sample a class-conditional pipeline into a PNG grid: one row per class.

    python -m qdiff.sample                                   # the embedded teacher
    python -m qdiff.sample --pipeline runs/x/export --steps 50 --out grid.png
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
    InputError,
    add_debug_flag,
    check_steps,
    component_config,
    nonnegative_float,
    nonnegative_int,
    pipeline_folder,
    positive_int,
    run_main,
    writable_output,
)
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


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse a pipeline, class, step count or output that cannot work, before loading."""
    index = pipeline_folder(args.pipeline)
    writable_output(args.out)
    if index and "class_embedder" not in index:
        raise InputError(f"--pipeline {args.pipeline} has no class embedder: qdiff.sample "
                         f"draws class-conditional pipelines (e.g. assets/tiny-ldm-digits).")
    num_classes = component_config(args.pipeline, "class_embedder").get("num_classes")
    if num_classes is not None:
        check_classes(args.classes, num_classes, args.pipeline)
    check_steps(args.pipeline, args.steps)


def check_classes(classes: list[int], num_classes: int, pipeline: str) -> None:
    outside = sorted({label for label in classes if not 0 <= label < num_classes})
    if outside:
        raise InputError(f"--classes {','.join(map(str, outside))}: the pipeline {pipeline} "
                         f"has classes 0..{num_classes - 1}; give classes in that range.")


def sample_grid(pipeline_path: str, classes: list[int], per_class: int, steps: int,
                guidance: float, seed: int, out: Path) -> Path:
    """Generate `per_class` images of each class from fixed seeds and save them as a grid."""
    pipe = load_pipeline(pipeline_path)
    embedder = getattr(pipe, "class_embedder", None)
    if embedder is None:
        raise InputError(f"--pipeline {pipeline_path} has no class embedder: qdiff.sample "
                         f"draws class-conditional pipelines (e.g. assets/tiny-ldm-digits).")
    check_classes(classes, embedder.null_class, pipeline_path)
    pipe.set_progress_bar_config(desc=f"sampling {len(classes) * per_class} images")
    labels = [label for label in classes for _ in range(per_class)]
    generator = torch.Generator().manual_seed(seed)
    images = pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps,
                  generator=generator, output_type="pt").images
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, out, nrow=per_class, padding=1)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qdiff.sample",
                                     description="Sample a class-conditional qdiff pipeline.")
    parser.add_argument("--pipeline", default="assets/tiny-ldm-digits",
                        help="pipeline folder (teacher or export)")
    parser.add_argument("--classes", type=_class_list, default=list(range(10)))
    parser.add_argument("--per-class", type=positive_int, default=8)
    parser.add_argument("--steps", type=positive_int, default=20, help="DDIM steps")
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
    path = sample_grid(args.pipeline, args.classes, args.per_class, args.steps, args.guidance,
                       args.seed, args.out)
    logger.info("wrote %s (%d classes x %d samples, %d steps, guidance %.1f) in %.1fs",
                path, len(args.classes), args.per_class, args.steps, args.guidance,
                time.time() - start)

if __name__ == "__main__":
    main()
