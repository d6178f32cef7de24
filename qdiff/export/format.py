"""The export format: the `quantization_config` that the denoiser's config.json carries.

    "quantization_config": {
      "quant_method": "qdiff", "format_version": 5,
      "weight_granularity": "per_output_channel", "weight_packing": "dense_le",
      "weights_file": "diffusion_pytorch_model.safetensors", "weights_sha256": "...",
      "recipe": {...the QuantConfig the student was built from...},
      "layers": {"conv_in": {"type": "Conv2d", "weight_bits": 8, "weight_symmetric": false,
                             "act_bits": 8, "act_symmetric": false,
                             "act_granularity": "per_tensor_per_timestep",
                             "act_table_size": 50, "weight_shape": [32, 3, 3, 3],
                             "act_split": [], "input_rotation": "none",
                             "act_group_size": 0}, ...}}

`act_split` lists the input-channel widths of a layer whose input is quantized in
slices, each with its own activation table (`SplitIntLayer`); empty for one table.
Version 2 added it; version 1 files (no `act_split`) still load. `input_rotation` is
"hadamard" for a Linear that rotates its input by `qdiff.quant.rotation.HadamardRotation`
before quantizing it (its codes are those of the rotated weight), else "none". Version 3
added it; older files (no `input_rotation`) load as "none". Version 4 lets a split Linear
rotate its input (the whole input, before it is sliced): it exported per-token
activations quantized in channel groups (`quant.act_group_size`) as equal slices, each
with a copy of the layer's clip-ratio table; such files still load. Version 5 stores
them as one layer instead: `act_group_size` > 0 (per-token layers only) gives each
token one grid per that many consecutive input channels; 0 (older files) means one grid
per token.

Config files are data: this module only reads and checks JSON-shaped dicts, and every
problem is an `ExportFormatError` that names the file and what is wrong with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from qdiff.errors import QdiffError

QUANT_METHOD = "qdiff"
FORMAT_VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
LAYER_TYPES = ("Linear", "Conv2d", "Conv3d")
INPUT_ROTATIONS = ("none", "hadamard")


class ExportFormatError(QdiffError, ValueError):
    """An export folder is incomplete, damaged or of an unknown format version."""


@dataclass(frozen=True)
class LayerSpec:
    """How one integer layer is stored: what its tensors mean, not the tensors themselves."""

    type: str
    weight_bits: int
    weight_symmetric: bool
    act_bits: int
    act_symmetric: bool
    act_granularity: str
    act_table_size: int  # timestep entries (per-tensor tables) or timestep groups (per token)
    weight_shape: tuple[int, ...]
    act_split: tuple[int, ...] = ()  # input-channel widths of the slices, each with its own table
    input_rotation: str = "none"  # "hadamard": the input is multiplied by H before quantization
    act_group_size: int = 0  # per-token grids over this many input channels each; 0: one per token

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "weight_shape": list(self.weight_shape),
                "act_split": list(self.act_split)}

    def part(self, width: int) -> "LayerSpec":
        """The spec of one input slice of `width` channels (a plain layer, one table; the
        whole layer rotates its input before slicing it)."""
        shape = (self.weight_shape[0], width) + self.weight_shape[2:]
        return replace(self, weight_shape=shape, act_split=(), input_rotation="none")

    @classmethod
    def from_json(cls, name: str, data: Any, source: Path) -> "LayerSpec":
        keys = [f.name for f in fields(cls)]
        if isinstance(data, Mapping):  # fields that format versions 1 to 4 lack
            data = {"act_split": [], "input_rotation": "none", "act_group_size": 0, **data}
        if not isinstance(data, Mapping) or sorted(data) != sorted(keys):
            raise ExportFormatError(f"{source}: layer '{name}' must have exactly the keys {keys}, "
                                    f"got {sorted(data) if isinstance(data, Mapping) else data!r}.")
        shape, split = data["weight_shape"], data["act_split"]
        problems = [
            data["type"] not in LAYER_TYPES and f"type {data['type']!r} is not one of {LAYER_TYPES}",
            data["act_granularity"] not in _act_codes()
            and f"act_granularity {data['act_granularity']!r} is not one of {tuple(_act_codes())}",
            not all(_is_int(data[key], 2, 8) for key in ("weight_bits", "act_bits"))
            and "bits must be integers in 2..8",
            not _is_int(data["act_table_size"], 1) and "act_table_size must be a positive integer",
            not (isinstance(shape, list) and shape and all(_is_int(d, 1) for d in shape))
            and "weight_shape must be a list of positive integers",
            not all(isinstance(data[key], bool) for key in ("weight_symmetric", "act_symmetric"))
            and "weight_symmetric and act_symmetric must be true or false",
            split != [] and not (isinstance(split, list) and len(split) >= 2 and all(_is_int(w, 1) for w in split)
                           and isinstance(shape, list) and len(shape) > 1 and sum(split) == shape[1])
            and "act_split must be empty or two or more positive widths that add up to weight_shape[1]",
            data["input_rotation"] not in INPUT_ROTATIONS
            and f"input_rotation {data['input_rotation']!r} is not one of {INPUT_ROTATIONS}",
            data["input_rotation"] != "none" and data["type"] != "Linear"
            and "only a Linear layer can rotate its input",
            _group_problem(data),
        ]
        problems = [p for p in problems if p]
        if problems:
            raise ExportFormatError(f"{source}: layer '{name}': {'; '.join(problems)}.")
        return cls(**{**data, "weight_shape": tuple(shape), "act_split": tuple(split)})


def _act_codes() -> Mapping[str, type]:
    """The registered act_granularity values -> their codes modules (`act_codes.ACT_CODES`)."""
    from .act_codes import ACT_CODES  # late: this module reads JSON and needs no torch until here
    return ACT_CODES


def _group_problem(data: Mapping[str, Any]) -> str:
    """What is wrong with a layer's `act_group_size`, or "" (checked after the other keys)."""
    group, shape, split = data["act_group_size"], data["weight_shape"], data["act_split"]
    if not _is_int(group, 0):
        return "act_group_size must be a non-negative integer"
    if group == 0:
        return ""
    grouped = [name for name, cls in _act_codes().items() if cls.channel_groups]
    if data["act_granularity"] not in grouped:
        return f"act_group_size > 0 needs act_granularity {' or '.join(map(repr, grouped))}"
    widths = split or (shape[1:2] if isinstance(shape, list) else [])
    if not widths or any(not _is_int(w, 1) or w % group for w in widths):
        return (f"act_group_size {group} must divide the input width (weight_shape[1], or each "
                f"act_split width)")
    return ""


def _is_int(value: Any, low: int, high: float = float("inf")) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def quantization_config(layers: Mapping[str, LayerSpec], recipe: Mapping[str, Any],
                        weights_sha256: str) -> dict[str, Any]:
    """The JSON block written under `quantization_config` in the denoiser's config.json."""
    granularities = sorted({spec.act_granularity for spec in layers.values()})
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "weight_granularity": "per_output_channel",
        "act_granularity": granularities[0] if len(granularities) == 1 else granularities,
        "weight_packing": "dense_le",  # 8 codes of b bits in b bytes, offset by qmin
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": weights_sha256,
        "recipe": dict(recipe),
        "layers": {name: spec.to_json() for name, spec in layers.items()},
    }


def check_quantization_config(config: Any, source: Path) -> dict[str, LayerSpec]:
    """Validate the block read from `source`; return its layer specs by qualified name."""
    if not isinstance(config, Mapping):
        raise ExportFormatError(f"{source}: no `quantization_config`; this is not a qdiff export "
                                f"(load a float model with its own diffusers class instead).")
    if config.get("quant_method") != QUANT_METHOD:
        raise ExportFormatError(f"{source}: quant_method is '{config.get('quant_method')}', "
                                f"expected '{QUANT_METHOD}'.")
    version = config.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = ("it was written by a newer qdiff; upgrade qdiff to load it" if newer
                else "re-export the model with this qdiff")
        raise ExportFormatError(f"{source}: export format version {version!r} is not known to this "
                                f"qdiff (it reads versions {list(READABLE_VERSIONS)}); {hint}.")
    missing = [key for key in ("weights_file", "weights_sha256", "layers") if key not in config]
    if missing:
        raise ExportFormatError(f"{source}: quantization_config lacks {missing}; the export is damaged.")
    if config["weights_file"] != WEIGHTS_FILE:
        raise ExportFormatError(f"{source}: weights_file must be '{WEIGHTS_FILE}', "
                                f"got {config['weights_file']!r}.")
    return {name: LayerSpec.from_json(name, data, source) for name, data in config["layers"].items()}
