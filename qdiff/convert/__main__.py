"""`python -m qdiff.convert ldm CKPT OUT`: an original checkpoint -> a qdiff pipeline folder.
`python -m qdiff.convert torchao EXPORT OUT`: a qdiff export -> its portable torchao form."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from qdiff.cli import add_debug_flag, positive_float, positive_int, run_main, writable_folder

from .ldm import LDMOptions, convert_checkpoint

logger = logging.getLogger("qdiff.convert")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qdiff.convert", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    ldm = sub.add_parser("ldm", help="latent-diffusion class-conditional LDM (e.g. cin256-v2.ckpt)")
    ldm.add_argument("checkpoint", type=Path, help=".ckpt (read with weights_only) or .safetensors")
    ldm.add_argument("out", type=Path, help="new pipeline folder to write, e.g. models/ldm4-cin256")
    defaults = LDMOptions()
    ldm.add_argument("--num-heads", type=positive_int, default=defaults.num_heads,
                     help="attention heads of the UNet (cin256-v2: 1; not visible in the weights)")
    ldm.add_argument("--latent-size", type=positive_int, default=defaults.latent_size,
                     help="latent height/width (cin256-v2: 64)")
    ldm.add_argument("--scale-factor", type=positive_float, default=defaults.scale_factor,
                     help="LatentDiffusion scale_factor (cin256-v2: 1.0)")
    add_debug_flag(ldm)
    torchao = sub.add_parser("torchao", help="a qdiff export -> the torchao form stock diffusers loads "
                                             "without qdiff (docs/guides/export-and-inference.md)")
    torchao.add_argument("export", type=Path, help="a qdiff export folder, e.g. runs/x/export")
    torchao.add_argument("out", type=Path, help="new pipeline folder to write")
    add_debug_flag(torchao)
    return parser.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse a missing checkpoint or an output folder that is taken or unwritable, first."""
    if args.kind == "torchao":
        if not (args.export / "model_index.json").is_file():
            raise FileNotFoundError(f"No pipeline at {args.export}; give a qdiff export folder "
                                    f"(it holds model_index.json).")
    elif not args.checkpoint.is_file():
        raise FileNotFoundError(f"No checkpoint at {args.checkpoint}; give the path of a .ckpt "
                                f"or .safetensors file.")
    writable_folder(args.out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_main(lambda: _run(args), args, interrupted=f"nothing was written to {args.out}")


def _run(args: argparse.Namespace) -> None:
    check_inputs(args)
    if args.kind == "torchao":
        from qdiff.export import convert_export
        from qdiff.export.torchao_format import require_torchao

        require_torchao()
        convert_export(args.export, args.out)
        logger.info("wrote %s: loads with DiffusionPipeline.from_pretrained(path, dtype=...) "
                    "where torchao is installed", args.out)
        return
    options = LDMOptions(args.num_heads, args.latent_size, args.scale_factor)
    pipe = convert_checkpoint(args.checkpoint, args.out, options)
    params = sum(p.numel() for p in pipe.unet.parameters())
    logger.info("wrote %s: UNet %.1fM parameters, %d classes + null class", args.out, params / 1e6,
                pipe.class_embedder.null_class)


if __name__ == "__main__":
    main()
