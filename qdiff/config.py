"""Typed configuration for every qdiff workflow.

One dataclass per block (model, quant, lora, aux, distill, export, eval), gathered in
`RunConfig`. A YAML file fills them, `key=value` strings override single fields, and
every value is checked: an unknown key names the closest valid one, a wrong type or an
out-of-range value names the field and what is allowed.

    cfg = load_config("configs/tiny-ldm-w4a4.yaml", ["quant.act_bits=8"])

A YAML file may start from another one with `extends: other.yaml` (a path relative to
the file); its own keys then override the other file's.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qdiff.errors import QdiffError

BITS_RANGE = (2, 8)
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(QdiffError, ValueError):
    """A config value or key is wrong; the message says which and how to fix it."""


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        lowered = {choice.lower(): choice for choice in choices}
        close = [lowered[c] for c in difflib.get_close_matches(str(value).lower(), lowered, n=1, cutoff=0.5)]
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{name}='{value}' is not allowed; choose one of {list(choices)}.{hint}")


def act_modes() -> tuple[str, ...]:
    """The registered `quant.act_mode` values (`qdiff.quant.register_act_quantizer`)."""
    from qdiff.quant import act_modes as registered  # late: qdiff.quant imports this module
    return registered()


def weight_modes() -> tuple[str, ...]:
    """The registered `quant.weight_mode` values (`qdiff.quant.register_weight_quantizer`)."""
    from qdiff.quant import weight_modes as registered  # late: qdiff.quant imports this module
    return registered()


def family_names() -> tuple[str, ...]:
    """"auto" and the registered `model.family` values (`qdiff.families.register_family`)."""
    from qdiff.families import FAMILIES  # late: qdiff.families imports this module
    return ("auto", *FAMILIES)


def _family_conditions(name: str) -> str:
    from qdiff.families import FAMILIES
    return FAMILIES[name].conditions


def _scheduler_class(name: str) -> None:
    """Check that `name` is a diffusers scheduler class."""
    import diffusers

    from diffusers import SchedulerMixin
    candidate = getattr(diffusers, name, None)
    if not (isinstance(candidate, type) and issubclass(candidate, SchedulerMixin)):
        known = [n for n in dir(diffusers) if n.endswith("Scheduler")]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.scheduler='{name}' is not a diffusers scheduler class.{hint} "
                          f"Give a class name such as UniPCMultistepScheduler, or leave it unset "
                          f"for the pipeline's own.")


# Keys that existed once: their config lines get a message saying what replaced them.
REMOVED_KEYS = {
    "distill.target": "every denoiser call's raw output is matched now, the conditional and "
                      "null predictions each (what `target: branches` did); delete the line",
}


def _act_quantizer_class(mode: str) -> type:
    from qdiff.quant import act_quantizer_class
    return act_quantizer_class(mode)


def _check_finite(name: str, value: float, allowed: str = "") -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value} is not a finite number; give a number"
                          f"{', ' + allowed if allowed else ''}.")


def _finite_floats(block: str) -> typing.Callable[[type], type]:
    """Class decorator: every float field of the dataclass must be finite (checked first).

    A range check alone lets NaN through (`nan < low` is False), so each float field,
    including one added later, is checked here by its type before `__post_init__` runs.
    """
    def decorate(cls: type) -> type:
        checks = cls.__dict__.get("__post_init__")

        def __post_init__(self) -> None:
            for item in dataclasses.fields(self):
                value = getattr(self, item.name)
                if isinstance(value, float):
                    _check_finite(f"{block}.{item.name}", value, f"e.g. the default {item.default}")
            if checks is not None:
                checks(self)

        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
        return cls
    return decorate


def _check_range(name: str, value: float, low: float, high: float | None = None) -> None:
    allowed = f"{low}..{high}" if high is not None else f">= {low}"
    _check_finite(name, value, f"allowed: {allowed}")
    if value < low or (high is not None and value > high):
        raise ConfigError(f"{name}={value} is out of range; allowed: {allowed}.")


def _check_bits(name: str, value: int | None) -> None:
    if value is not None:
        _check_range(name, value, *BITS_RANGE)


@_finite_floats("model")
@dataclass
class ModelConfig:
    """The full-precision teacher pipeline."""

    path: str = "assets/tiny-ldm-digits"  # a local pipeline folder or a hub id
    family: str = "auto"  # a registered family (qdiff.families); "auto" reads it from the pipeline
    # the diffusers scheduler class trajectories are walked with (from the pipeline's
    # scheduler config), e.g. UniPCMultistepScheduler; None: the pipeline's own
    scheduler: Optional[str] = None
    dtype: str = "float32"  # the teacher denoiser's compute dtype (the student trains in float32)
    prompts: Optional[str] = None  # text-conditioned families: a file with one prompt per line
    # wan / cogvideox: [frames, height, width] of the trajectories' videos (pixels);
    # None: the model's own (Wan 2.1 81 x 480 x 832, CogVideoX 49 x 480 x 720)
    video_size: Optional[List[int]] = None
    image_size: Optional[List[int]] = None  # image families: [height, width]; None: the pipeline's
    images: Optional[str] = None  # image-to-video families: a folder of first frames
    # further arguments of every pipeline call, as they are (e.g. max_sequence_length: 512)
    pipeline_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_choice("model.family", self.family, family_names())
        _check_choice("model.dtype", self.dtype, DTYPES)
        if self.scheduler is not None:
            _scheduler_class(self.scheduler)
        if self.family != "auto" and _family_conditions(self.family) == "prompts" and not self.prompts:
            raise ConfigError(f"model.family='{self.family}' distils from prompts: set "
                              f"model.prompts to a text file with one prompt per line, e.g. "
                              f"configs/prompts/coco-captions-sample.txt.")
        if self.video_size is not None:
            if len(self.video_size) != 3:
                raise ConfigError(f"model.video_size={self.video_size} must be [frames, height, "
                                  f"width], e.g. [81, 480, 832].")
            for name, value in zip(("frames", "height", "width"), self.video_size):
                _check_range(f"model.video_size {name}", value, 1)
        if self.image_size is not None:
            if len(self.image_size) != 2:
                raise ConfigError(f"model.image_size={self.image_size} must be [height, width], "
                                  f"e.g. [1024, 1024].")
            for name, value in zip(("height", "width"), self.image_size):
                _check_range(f"model.image_size {name}", value, 1)


@dataclass
class LayerOverride:
    """Bit-widths for the layers whose qualified name matches `pattern` (fnmatch)."""

    pattern: str = MISSING
    weight_bits: Optional[int] = None
    act_bits: Optional[int] = None

    def __post_init__(self) -> None:
        _check_bits(f"quant.overrides[{self.pattern}].weight_bits", self.weight_bits)
        _check_bits(f"quant.overrides[{self.pattern}].act_bits", self.act_bits)


@_finite_floats("quant")
@dataclass
class QuantConfig:
    """How the student's layers are quantized (weights per channel, activations per timestep)."""

    weight_bits: int = 4
    act_bits: int = 4
    weight_symmetric: bool = False  # EfficientDM: asymmetric per-output-channel weights
    act_symmetric: bool = False
    weight_init: str = "mse"  # "minmax", or "mse": search of clipping ratios under an Lp norm
    lp_norm: float = 2.4
    learn_zero_point: bool = False  # LSQ+ instead of LSQ
    lsq_grad_scale: bool = True  # scale step-size gradients by 1/sqrt(numel * qmax)
    # "per_channel" (LSQ step size per output channel), or a mode registered with
    # qdiff.quant.register_weight_quantizer
    weight_mode: str = "per_channel"
    # "temporal" (LSQ table per timestep), "dynamic_per_token", or a mode registered with
    # qdiff.quant.register_act_quantizer
    act_mode: str = "temporal"
    act_init: str = "mse"  # "mse" (Lp search) or "minmax" (temporal: the observed range; dynamic: ratio 1)
    act_per_timestep: bool = True  # temporal: False starts every timestep from one pooled range
    act_timestep_groups: int = 10  # dynamic_per_token: clipping ratios per bucket of timesteps
    # dynamic_per_token: each token's channels in consecutive groups of this many, each group
    # on its own grid (as NVFP4's 16-wide blocks); 0: one grid per token
    act_group_size: int = 0
    include: List[str] = field(default_factory=lambda: ["*"])  # fnmatch on layer names
    exclude: List[str] = field(default_factory=list)  # layers kept in full precision
    overrides: List[LayerOverride] = field(default_factory=list)
    packed_base_weight: bool = False  # hold the frozen base weight as integer codes
    family_overrides: bool = False  # also keep the family's layers at 8 bit (after `overrides`)
    # UNets: quantize each part of a concatenated input (decoder features, skip) with its
    # own step sizes (Q-Diffusion's shortcut splitting; qdiff.quant.concat_inputs)
    split_concat_inputs: bool = False
    # Linear layers (fnmatch) whose input is rotated by a Hadamard matrix before it is
    # quantized, the weight rotated to match (qdiff.quant.rotation); online at inference
    rotate_inputs: List[str] = field(default_factory=list)
    calibration_samples: int = 32  # teacher trajectories used to initialise the scales

    def __post_init__(self) -> None:
        _check_bits("quant.weight_bits", self.weight_bits)
        _check_bits("quant.act_bits", self.act_bits)
        _check_choice("quant.weight_mode", self.weight_mode, weight_modes())
        _check_choice("quant.weight_init", self.weight_init, ("minmax", "mse"))
        _check_choice("quant.act_mode", self.act_mode, act_modes())
        _check_choice("quant.act_init", self.act_init, ("minmax", "mse"))
        _check_range("quant.lp_norm", self.lp_norm, 1.0)
        _check_range("quant.calibration_samples", self.calibration_samples, 1)
        _check_range("quant.act_timestep_groups", self.act_timestep_groups, 1)
        _check_range("quant.act_group_size", self.act_group_size, 0)
        grouped = [mode for mode in act_modes() if _act_quantizer_class(mode).channel_groups]
        if self.act_group_size and self.act_mode not in grouped:
            raise ConfigError(f"quant.act_group_size={self.act_group_size} needs "
                              f"quant.act_mode={' or '.join(grouped)} (a per-tensor step size has "
                              f"no token to group); set act_group_size=0 or change act_mode.")


@_finite_floats("lora")
@dataclass
class LoRAConfig:
    """QALoRA: low-rank B@A added to the weight before it is quantized (merges away)."""

    enabled: bool = True
    rank: int = 32
    scale_aware_lr: bool = True  # per-layer learning rate proportional to the weight step size
    # B and A's gradients from rank-r products, without the full weight gradient (Linear and
    # ungrouped Conv2d); needs distill.weight_scale_lr=0 (qdiff/quant/lora_backward.py)
    low_rank_backward: bool = False

    def __post_init__(self) -> None:
        _check_range("lora.rank", self.rank, 1)


@_finite_floats("aux")
@dataclass
class AuxConfig:
    """QVGen auxiliary modules Phi = L@R, removed by rank decay before export."""

    enabled: bool = False
    rank: int = 32
    phase_steps: Optional[int] = None  # steps per rank-halving phase; None: spread over the run
    decay: str = "cosine"  # how the lower half of the rank fades within a phase

    def __post_init__(self) -> None:
        _check_range("aux.rank", self.rank, 1)
        if self.phase_steps is not None:
            _check_range("aux.phase_steps", self.phase_steps, 1)
        _check_choice("aux.decay", self.decay, ("cosine", "linear"))


@_finite_floats("distill")
@dataclass
class DistillConfig:
    """Data-free distillation on the teacher's own sampling trajectories."""

    steps: int = 1000  # optimizer steps; one per denoising step of a trajectory
    trajectory_steps: int = 100  # denoising steps of each pipeline call (num_inference_steps)
    eta: float = 0.0  # DDIM eta, for pipelines whose __call__ takes one (0: deterministic)
    guidance_scale: float = 2.0  # classifier-free guidance of the teacher
    batch_size: int = 16
    lr: float = 5e-4  # QALoRA; with lora.scale_aware_lr, the mean of the per-layer rates
    act_lr: float = 5e-4  # temporal activation step sizes (EfficientDM: 5e-4)
    # one rate per step-size table, proportional to its mean step (mean over tables: act_lr),
    # so the small tables of 8-bit layers do not cross zero (qdiff.quant.act_param_groups)
    scale_aware_act_lr: bool = False
    weight_scale_lr: float = 1e-6  # weight step sizes (EfficientDM: 1e-6)
    aux_lr: float = 1e-4  # QVGen Phi factors
    base_weight_lr: float = 0.0  # the weights W0 themselves: 0 keeps them frozen (qdiff);
    # > 0 with lora.enabled=false is full QAT (LSQ on all weights), the baseline of eval/quality/benchmark.py
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, then linear decay to 0 (as EfficientDM)
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    # > 0: the run's student (grids, export) is the exponential moving average of the trained
    # parameters, its decay ramping as (1 + step) / (ema_ramp + step) up to this cap, e.g. 0.995
    # (qdiff.distill.ema); 0: the last step's
    ema_decay: float = 0.0
    # under the cap the average weights step s about as s^(ema_ramp - 2), so it is on average
    # steps / ema_ramp old: 10 (diffusers' EMAModel) about a tenth of the run, 3 a third
    ema_ramp: float = 10.0
    # recompute each block's activations in the backward pass instead of keeping them
    # (diffusers' own switch): at SD's layout qdiff's peak -30%, its step time +23%
    gradient_checkpointing: bool = False
    # of each denoiser call's raw output (the conditional and the null prediction each):
    # "x0": MSE of the clean samples they imply (weighted from the pipeline's scheduler);
    # "mse" / "l1" of the outputs themselves (qdiff.distill.loss)
    loss: str = "x0"
    walker: str = "student"  # who takes each trajectory step: "student" (its own path) or "teacher"
    checkpoint_every: int = 200
    sample_every: int = 200  # steps between PNG grids of teacher vs student
    log_every: int = 10
    # The run stops (DivergenceError, no export) when the mean loss over the last trajectory
    # exceeds this many times the mean over its first trajectory, or the loss at a trajectory's
    # first denoising step this many times the untrained student's there
    # (qdiff.distill.divergence). A healthy run's loss falls from both, so its ratios stay
    # below 1; a run that broke down is orders of magnitude over: 10 is far from both. 0: off
    divergence_factor: float = 10.0

    def __post_init__(self) -> None:
        for name in ("steps", "trajectory_steps", "batch_size", "checkpoint_every",
                     "sample_every", "log_every"):
            _check_range(f"distill.{name}", getattr(self, name), 1)
        _check_range("distill.eta", self.eta, 0.0, 1.0)
        _check_range("distill.guidance_scale", self.guidance_scale, 0.0)
        for name in ("lr", "act_lr", "weight_scale_lr", "aux_lr", "base_weight_lr"):
            _check_range(f"distill.{name}", getattr(self, name), 0.0)
        _check_range("distill.weight_decay", self.weight_decay, 0.0)
        _check_range("distill.warmup_steps", self.warmup_steps, 0)
        _check_range("distill.grad_clip", self.grad_clip, 0.0)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"distill.ema_decay={self.ema_decay} is out of range; allowed: "
                              f"0 (no average) or a decay in (0, 1), e.g. 0.995.")
        if self.ema_ramp < 2.0:
            raise ConfigError(f"distill.ema_ramp={self.ema_ramp} would weight the first steps "
                              f"most; allowed: 2 (every step alike) or more, e.g. 10.")
        if not (self.divergence_factor == 0 or self.divergence_factor > 1):
            raise ConfigError(f"distill.divergence_factor={self.divergence_factor} is out of "
                              f"range; allowed: 0 (no check) or a finite factor above 1, e.g. 10.")
        if self.loss == "update":
            raise ConfigError("distill.loss='update' was removed: a multistep scheduler's update "
                              "has no one-step form; use distill.loss=x0, which weights each "
                              "call by how far its error moves the clean sample.")
        _check_choice("distill.loss", self.loss, ("x0", "mse", "l1"))
        _check_choice("distill.walker", self.walker, ("student", "teacher"))
        if self.walker == "student" and self.checkpoint_every % self.trajectory_steps:
            raise ConfigError(
                f"distill.checkpoint_every={self.checkpoint_every} must be a multiple of "
                f"distill.trajectory_steps={self.trajectory_steps} when distill.walker='student': "
                f"a resumed run cannot replay the student's path, so checkpoints fall between "
                f"trajectories. Set checkpoint_every to a multiple, or distill.walker=teacher.")


@_finite_floats("export")
@dataclass
class ExportConfig:
    """The low-bit pipeline folder written at the end of a run."""

    enabled: bool = True
    dir: Optional[str] = None  # default: <run dir>/export
    # "qdiff": integer layers (loads after `import qdiff`); "torchao": stock diffusers classes
    # with torchao int8 weights and dynamic per-token int8 activations (qdiff/export/torchao_format.py)
    format: str = "qdiff"

    def __post_init__(self) -> None:
        _check_choice("export.format", self.format, ("qdiff", "torchao"))
        if self.format == "torchao" and importlib.util.find_spec("torchao") is None:
            raise ConfigError("export.format=torchao needs torchao, which is not installed: "
                              "pip install qdiff-toolkit[torchao]")


@_finite_floats("eval")
@dataclass
class EvalConfig:
    """How samples are drawn and scored (`python -m qdiff.eval`)."""

    num_samples: int = 1000
    steps: int = 20
    guidance_scale: float = 2.0
    batch_size: int = 100
    seed: int = 0
    features: str = "digits"  # "digits", "inception", or a path to a feature network
    metrics: List[str] = field(default_factory=lambda: ["fid", "sfid", "accuracy"])

    def __post_init__(self) -> None:
        for name in ("num_samples", "steps", "batch_size"):
            _check_range(f"eval.{name}", getattr(self, name), 1)
        _check_range("eval.guidance_scale", self.guidance_scale, 0.0)
        for metric in self.metrics:
            _check_choice("eval.metrics", metric,
                          ("fid", "sfid", "is", "precision", "recall", "accuracy"))


@dataclass
class RunConfig:
    """A whole qdiff run: what to distil, how, and where its files go."""

    name: Optional[str] = None  # default: the config file's name
    output_dir: str = "runs"  # the run lives in <output_dir>/<name>
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    aux: AuxConfig = field(default_factory=AuxConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.distill.base_weight_lr > 0 and self.quant.packed_base_weight:
            raise ConfigError(
                f"distill.base_weight_lr={self.distill.base_weight_lr} trains the base weights, "
                f"but quant.packed_base_weight=true holds them as frozen integer codes. Set "
                f"quant.packed_base_weight=false for full QAT, or distill.base_weight_lr=0.")
        if self.lora.low_rank_backward and self.distill.weight_scale_lr > 0:
            raise ConfigError(
                f"lora.low_rank_backward=true forms no full weight gradient, which training the "
                f"weight step sizes (distill.weight_scale_lr={self.distill.weight_scale_lr}) needs. "
                f"Set distill.weight_scale_lr=0 to freeze them, or lora.low_rank_backward=false.")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / (self.name or "run")


def _nested_schema(schema: type, key: str) -> Optional[type]:
    """The dataclass that field `key` of `schema` holds, directly or as list items."""
    hint = typing.get_type_hints(schema)[key]
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate  # type: ignore[return-value]
    return None


def _check_block(path: str, value: Any, hint: Any) -> None:
    """A block of keys (or a list of them) must be given as one, not as a single value."""
    if value is None:
        return
    if typing.get_origin(hint) is list:
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and all(isinstance(item, Mapping) for item in items):
            return
        raise ConfigError(f"'{path}' must be a list of blocks of keys, got {value!r}; e.g. "
                          f"{path}=[{{pattern: conv_in, weight_bits: 8}}].")
    if not isinstance(value, Mapping):
        raise ConfigError(f"'{path}' must be a block of keys, got {value!r}; write '{path}:' "
                          f"followed by indented `key: value` lines, or set one key with "
                          f"{path}.KEY=VALUE.")


def check_keys(data: Mapping[str, Any], schema: type = RunConfig, prefix: str = "") -> None:
    """Raise ConfigError for the first key of `data` that `schema` does not have."""
    known = [f.name for f in dataclasses.fields(schema)]
    for key, value in data.items():
        path = f"{prefix}{key}"
        if path in REMOVED_KEYS:
            raise ConfigError(f"Config key '{path}' was removed: {REMOVED_KEYS[path]}.")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown config key '{path}'.{hint} Valid keys here: {known}.")
        nested = _nested_schema(schema, key)
        if nested is None:
            continue
        _check_block(path, value, typing.get_type_hints(schema)[key])
        if isinstance(value, Mapping):
            check_keys(value, nested, f"{path}.")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, Mapping):
                    check_keys(item, nested, f"{path}[{index}].")


def _parse_yaml(path: Path) -> Any:
    """The YAML document in `path`; a file that is not UTF-8 YAML names where it breaks."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); "
                          f"save the config as UTF-8 YAML.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}); fix the syntax there "
                          f"(indent with spaces, close every bracket and quote).") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, resolving `extends:` chains (relative to the file)."""
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}. Pass a path to a YAML file, "
                          f"for example configs/tiny-ldm-w4a4.yaml.")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `extends` forms a cycle through {[str(p) for p in seen]}.")
    data = _parse_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config blocks at the top level.")
    parent = data.pop("extends", None)
    try:
        check_keys(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends={parent!r} must be the path of another YAML file, "
                          f"e.g. extends: tiny-ldm-w4a4.yaml.")
    base = _read_yaml(path.parent / parent, seen + (path.resolve(),))
    return OmegaConf.to_container(OmegaConf.merge(base, data))  # type: ignore[return-value]


def _to_config(layers: Sequence[Mapping[str, Any]]) -> RunConfig:
    merged = OmegaConf.structured(RunConfig)
    try:
        for layer in layers:
            merged = OmegaConf.merge(merged, layer)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "config"
        reason = str(error).splitlines()[0]
        raise ConfigError(f"{key}: {reason}. Fix the value in the YAML file or the "
                          f"key=value override.") from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Build a validated RunConfig from a YAML file and `key=value` overrides.

    Args:
        path: The YAML file (its `extends` chain is read first), or None for the defaults.
        overrides: `key=value` strings (for example `quant.weight_bits=4`), applied after
            the file in order.

    Returns:
        The merged, validated config; its `name` is the file's stem unless the config sets one.

    Raises:
        ConfigError: The file is missing or not a mapping, its `extends` forms a cycle, an
            override is not `key=value`, or a key or value is invalid.
    """
    layers: list[Mapping[str, Any]] = []
    name = None
    if path is not None:
        path = Path(path)
        layers.append(_read_yaml(path))
        name = path.stem
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"Override '{override}' is not of the form key=value, "
                              f"for example quant.weight_bits=4.")
    if overrides:
        layers.append(OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))))
    for layer in layers:
        check_keys(layer)
    config = _to_config(layers)
    if config.name is None:
        config.name = name
    return config


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (what a run actually used).

    Args:
        config: The config to write.
        path: The YAML file to write (replaced if it exists).
    """
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
