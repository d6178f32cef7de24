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
from torchvision.utils import save_image

from qdiff.models.loading import load_pipeline

logger = logging.getLogger("qdiff.sample")


def _class_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes takes comma-separated integers, got '{text}'.")


def sample_grid(pipeline_path: str, classes: list[int], per_class: int, steps: int,
                guidance: float, seed: int, out: Path) -> Path:
    """Generate `per_class` images of each class from fixed seeds and save them as a grid."""
    pipe = load_pipeline(pipeline_path)
    pipe.set_progress_bar_config(desc=f"sampling {len(classes) * per_class} images")
    labels = [label for label in classes for _ in range(per_class)]
    generator = torch.Generator().manual_seed(seed)
    images = pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps,
                  generator=generator, output_type="pt").images
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, out, nrow=per_class, padding=1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample a class-conditional qdiff pipeline.")
    parser.add_argument("--pipeline", default="assets/tiny-ldm-digits",
                        help="pipeline folder (teacher or export)")
    parser.add_argument("--classes", type=_class_list, default=list(range(10)))
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("samples.png"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    start = time.time()
    path = sample_grid(args.pipeline, args.classes, args.per_class, args.steps, args.guidance,
                       args.seed, args.out)
    logger.info("wrote %s (%d classes x %d samples, %d steps, guidance %.1f) in %.1fs",
                path, len(args.classes), args.per_class, args.steps, args.guidance,
                time.time() - start)


if __name__ == "__main__":
    main()
