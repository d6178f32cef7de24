"""`python -m qdiff.convert ldm CKPT OUT`: an original checkpoint -> a qdiff pipeline folder."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .ldm import ConversionError, LDMOptions, convert_checkpoint

logger = logging.getLogger("qdiff.convert")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qdiff.convert", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    ldm = sub.add_parser("ldm", help="latent-diffusion class-conditional LDM (e.g. cin256-v2.ckpt)")
    ldm.add_argument("checkpoint", type=Path, help=".ckpt (read with weights_only) or .safetensors")
    ldm.add_argument("out", type=Path, help="pipeline folder to write, e.g. models/ldm4-cin256")
    defaults = LDMOptions()
    ldm.add_argument("--num-heads", type=int, default=defaults.num_heads,
                     help="attention heads of the UNet (cin256-v2: 1; not visible in the weights)")
    ldm.add_argument("--latent-size", type=int, default=defaults.latent_size,
                     help="latent height/width (cin256-v2: 64)")
    ldm.add_argument("--scale-factor", type=float, default=defaults.scale_factor,
                     help="LatentDiffusion scale_factor (cin256-v2: 1.0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    options = LDMOptions(args.num_heads, args.latent_size, args.scale_factor)
    try:
        pipe = convert_checkpoint(args.checkpoint, args.out, options)
    except (ConversionError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    params = sum(p.numel() for p in pipe.unet.parameters())
    logger.info("wrote %s: UNet %.1fM parameters, %d classes + null class", args.out, params / 1e6,
                pipe.class_embedder.null_class)


if __name__ == "__main__":
    main()
