"""Export: a trained student -> a diffusers pipeline folder with packed low-bit weights.

    path = export_pipeline(pipe, student, "runs/x/export", cfg.quant)
    path = export_pipeline(pipe, {"transformer": s1, "transformer_2": s2}, out, cfg.quant)
    pipe = qdiff.load_pipeline(path)                # in any process, after `import qdiff`
    pipe = DiffusionPipeline.from_pretrained(path)  # families whose pipeline is diffusers' own

Layout: `packing` (dense bit-packing), `format` (the `quantization_config` block),
`act_codes` (timestep-indexed activation codes), `int_ops` (the reference path's exact
integer sums), `int_layers` (integer Linear / Conv), `split_layer` (a layer whose input has
several activation tables, as a sum of integer layers), `fast_path` (the layers' fast
forward, on a kernel of `qdiff.kernels`), `freeze` (student layer -> integer layer),
`serialization` (safetensors + integrity checks), `models` (the denoiser classes
diffusers loads: `Quantized<X>`, generated for any diffusers model class X), `pipeline` (`export_pipeline`, atomic folder write), `verify`
(exactness checks against the student; `check_export` runs on every export of a run).
"""

from .format import FORMAT_VERSION, QUANT_METHOD, ExportFormatError, LayerSpec
from .int_layers import IntConv2d, IntConv3d, IntLayer, IntLinear
from . import models as _models
from .models import QuantizedModelMixin, quantized_class_for
from .pipeline import convert_export, export_pipeline
from .split_layer import SplitIntLayer
from .verify import EXPORT_TOLERANCE, ExportMismatchError, check_export, layer_mismatch, on_grid_reference

__all__ = [
    "EXPORT_TOLERANCE", "FORMAT_VERSION", "QUANT_METHOD",
    "ExportFormatError", "ExportMismatchError", "IntConv2d", "IntConv3d", "IntLayer", "IntLinear",
    "LayerSpec", "QuantizedModelMixin", "SplitIntLayer", "check_export", "convert_export", "export_pipeline",
    "layer_mismatch", "on_grid_reference", "quantized_class_for",
]


def __getattr__(name: str) -> type:
    """`from qdiff.export import QuantizedUNet2DConditionModel` (or any `Quantized<X>` of a
    diffusers model class X): the class `qdiff.export.models` generates."""
    if name.startswith(_models.PREFIX):
        return getattr(_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
