"""Train the embedded models on scikit-learn's digits and write them to `assets/`.

    python -m qdiff.models.zoo.digits            # runs on the CPU

writes
    assets/digits-features/   the feature network (FID/sFID/IS/accuracy on this domain)
                              and reference statistics of the real held-out digits
    assets/tiny-ldm-digits/   the class-conditional LDM teacher (VQ-f4, UNet, DDIM)

Each stage is skipped when its folder is already complete (use --force to retrain), and
the teacher is assembled in `tiny-ldm-digits.partial/` (the autoencoder is kept there
once trained), then renamed: a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from diffusers import VQModel
from safetensors.torch import save_file

from qdiff.eval.feature_nets import REFERENCE_STATS_FILE
from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline
from qdiff.models.zoo.digits_data import load_digits_split
from qdiff.models.zoo.train_autoencoder import reconstruction_error, train_vq_autoencoder
from qdiff.models.zoo.train_denoiser import build_ddim_scheduler, train_class_ldm
from qdiff.models.zoo.train_features import (held_out_accuracy, held_out_reference_stats,
                                             train_feature_net)

logger = logging.getLogger("qdiff.zoo")

FEATURES_DIR = "digits-features"
TEACHER_DIR = "tiny-ldm-digits"
MIN_FEATURE_ACCURACY = 0.97


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _finish(partial: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    logger.info("wrote %s", final)


def build_feature_net(out: Path, steps: int, seed: int, check_accuracy: bool) -> None:
    start = time.time()
    net = train_feature_net(steps=steps, seed=seed)
    accuracy = held_out_accuracy(net)
    logger.info("feature net: held-out accuracy %.4f", accuracy)
    if check_accuracy and accuracy < MIN_FEATURE_ACCURACY:
        raise RuntimeError(f"Feature network reached only {accuracy:.2%} held-out accuracy "
                           f"(need {MIN_FEATURE_ACCURACY:.0%}); train longer with --feature-steps.")
    partial = out / f"{FEATURES_DIR}.partial"
    net.save_pretrained(partial)
    save_file(held_out_reference_stats(net), partial / REFERENCE_STATS_FILE)
    _write_json(partial / "training.json", {
        "steps": steps, "seed": seed, "seconds": round(time.time() - start, 1),
        "held_out_accuracy": accuracy, "torch": torch.__version__})
    _finish(partial, out / FEATURES_DIR)


def build_teacher(out: Path, vae_steps: int, unet_steps: int, latent_copies: int,
                  seed: int) -> None:
    partial = out / f"{TEACHER_DIR}.partial"
    vae_dir = partial / "vae"
    start = time.time()
    if (vae_dir / "config.json").is_file():
        logger.info("reusing the autoencoder in %s", vae_dir)
        vae = VQModel.from_pretrained(vae_dir).eval()
    else:
        vae = train_vq_autoencoder(steps=vae_steps, seed=seed)
        vae.save_pretrained(vae_dir)
    vae_error = reconstruction_error(vae, load_digits_split("held_out").images)
    logger.info("autoencoder: held-out L1 reconstruction error %.4f", vae_error)
    unet, class_embedder = train_class_ldm(vae, steps=unet_steps, latent_copies=latent_copies,
                                           seed=seed)
    pipeline = ClassConditionalLDMPipeline(unet=unet, class_embedder=class_embedder, vae=vae,
                                           scheduler=build_ddim_scheduler())
    pipeline.save_pretrained(partial)
    _write_json(partial / "training.json", {
        "vae_steps": vae_steps, "unet_steps": unet_steps, "latent_copies": latent_copies,
        "seed": seed, "seconds": round(time.time() - start, 1),
        "vae_held_out_l1": vae_error, "torch": torch.__version__})
    _finish(partial, out / TEACHER_DIR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("assets"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--feature-steps", type=int, default=400)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=6000)
    parser.add_argument("--latent-copies", type=int, default=16,
                        help="augmented passes over the train split encoded for the UNet")
    parser.add_argument("--force", action="store_true", help="retrain finished stages too")
    parser.add_argument("--no-accuracy-check", action="store_true",
                        help="keep a feature net below 97%% accuracy (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.force or not (args.out / FEATURES_DIR / "training.json").is_file():
        build_feature_net(args.out, args.feature_steps, args.seed, not args.no_accuracy_check)
    if args.force or not (args.out / TEACHER_DIR / "training.json").is_file():
        build_teacher(args.out, args.vae_steps, args.unet_steps, args.latent_copies, args.seed)


if __name__ == "__main__":
    main()
