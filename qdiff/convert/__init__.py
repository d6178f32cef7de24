"""Converters from original checkpoints to the pipelines qdiff distils.

    python -m qdiff.convert ldm cin256-v2.ckpt models/ldm4-cin256

`ldm_layout` holds latent-diffusion's key layout as one table read both ways,
`ldm_schedule` the noise-schedule buffers, `ldm` the converter and its reverse.
"""

from .ldm import ConversionError, LDMOptions, convert, convert_checkpoint, read_checkpoint, to_original

__all__ = ["ConversionError", "LDMOptions", "convert", "convert_checkpoint", "read_checkpoint",
           "to_original"]
