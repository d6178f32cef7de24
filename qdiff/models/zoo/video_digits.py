"""Train the embedded video teacher on moving digits and write it to `assets/tiny-wan-digits/`.

    python -m qdiff.models.zoo.video_digits       # runs on the CPU

The pipeline is assembled in `tiny-wan-digits.partial/` and renamed when complete, so a
crash never leaves a folder that looks finished; an existing teacher is kept unless
`--force`. Its quality is checked at the end: the digits feature network
(`assets/digits-features`, built by `python -m qdiff.models.zoo.digits`) classifies every
frame of sampled videos, and `training.json` records the accuracy and how far the digit
moves (pixels per frame). A strip of sampled frames goes to `eval/results/video/video-teacher.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qdiff.eval.feature_nets import load_feature_net
from qdiff.eval.sampling import balanced_labels
from qdiff.eval.video_metrics import frame_accuracy, frame_features, mean_speed
from qdiff.models.class_video_pipeline import ClassConditionalVideoPipeline
from qdiff.models.zoo.moving_digits import FRAME_SIZE, NUM_FRAMES
from qdiff.models.zoo.train_video_denoiser import build_flow_scheduler, train_video_teacher

logger = logging.getLogger("qdiff.zoo")

TEACHER_DIR = "tiny-wan-digits"
STRIP_PATH = Path(__file__).resolve().parents[3] / "eval" / "results" / "video-teacher.png"
CHECK_GUIDANCE, CHECK_STEPS = 4.5, 20
MIN_FRAME_ACCURACY = 0.9


@torch.no_grad()
def sample_check_videos(pipe: ClassConditionalVideoPipeline, labels: torch.Tensor,
                        seed: int = 0) -> torch.Tensor:
    """Videos (N, F, C, H, W) in [0, 1] of `labels` at the check's guidance and steps."""
    return pipe(class_labels=labels, guidance_scale=CHECK_GUIDANCE,
                num_inference_steps=CHECK_STEPS, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).frames


def check_teacher(pipe: ClassConditionalVideoPipeline, num_videos: int,
                  seed: int = 0) -> dict[str, float]:
    """Per-frame class accuracy (digits network) and mean speed (pixels per frame at
    16x16) of `num_videos` sampled videos, classes balanced."""
    labels = balanced_labels(num_videos)
    videos = sample_check_videos(pipe, labels, seed)
    net, _ = load_feature_net("digits")
    return {"frame_accuracy": frame_accuracy(frame_features(net, videos).logits, labels),
            "mean_speed": mean_speed(videos)}


def write_frame_strip(pipe: ClassConditionalVideoPipeline, path: Path,
                      classes: tuple[int, ...] = (0, 3, 5, 8), seed: int = 0,
                      zoom: int = 4) -> None:
    """A PNG with one sampled video per row (its frames left to right), `zoom` times larger."""
    videos = sample_check_videos(pipe, torch.tensor(classes), seed)  # (N, F, 1, H, W)
    n, frames, _, height, width = videos.shape
    padded = torch.nn.functional.pad(videos[:, :, 0], (1, 1, 1, 1), value=0.5)
    grid = padded.permute(0, 2, 1, 3).reshape(n * (height + 2), frames * (width + 2))
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.kron(pixels, np.ones((zoom, zoom), dtype=np.uint8))).save(path)
    logger.info("wrote %s", path)


def build_video_teacher(out: Path, steps: int, batch_size: int, seed: int,
                        check_videos: int, strip: Path | None = STRIP_PATH) -> None:
    """Train, save to `out/tiny-wan-digits.partial`, check, rename; then draw the strip."""
    start = time.time()
    transformer, class_embedder = train_video_teacher(steps=steps, batch_size=batch_size, seed=seed)
    pipe = ClassConditionalVideoPipeline(transformer=transformer, class_embedder=class_embedder,
                                         scheduler=build_flow_scheduler(), num_frames=NUM_FRAMES,
                                         height=FRAME_SIZE, width=FRAME_SIZE)
    record = {"steps": steps, "batch_size": batch_size, "seed": seed,
              "seconds": round(time.time() - start, 1), "torch": torch.__version__}
    partial = out / f"{TEACHER_DIR}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    pipe.save_pretrained(partial)  # kept for inspection if the check below fails
    if check_videos:
        pipe.set_progress_bar_config(disable=True)
        check = check_teacher(pipe, check_videos)
        accuracy = check["frame_accuracy"]
        logger.info("sampled videos: per-frame class accuracy %.4f, digit moves %.2f "
                    "pixels per frame", accuracy, check["mean_speed"])
        if accuracy < MIN_FRAME_ACCURACY:
            raise RuntimeError(f"The video teacher in {partial} gets only {accuracy:.1%} of its "
                               f"frames classified as their class (need "
                               f"{MIN_FRAME_ACCURACY:.0%}); train longer with --steps.")
        record.update(check_videos=check_videos, check_guidance=CHECK_GUIDANCE,
                      check_steps=CHECK_STEPS, **check)
    (partial / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    final = out / TEACHER_DIR
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    logger.info("wrote %s", final)
    if strip is not None:
        write_frame_strip(pipe, strip)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--check-videos", type=int, default=200,
                        help="videos sampled to check per-frame class accuracy (0: no check)")
    parser.add_argument("--strip", type=Path, default=STRIP_PATH,
                        help="PNG of sampled frames written after training ('' for none)")
    parser.add_argument("--force", action="store_true", help="retrain an existing teacher")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.force or not (args.out / TEACHER_DIR / "training.json").is_file():
        build_video_teacher(args.out, args.steps, args.batch_size, args.seed, args.check_videos,
                            args.strip if str(args.strip) not in ("", ".") else None)


if __name__ == "__main__":
    main()
