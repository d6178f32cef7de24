"""latent-diffusion's class-conditional LDM checkpoint (cin256-v2.ckpt) -> a qdiff pipeline.

    python -m qdiff.convert ldm cin256-v2.ckpt models/ldm4-cin256

The result is the pipeline the embedded teacher also is: `ClassConditionalLDMPipeline`
with the VQ-f4 `VQModel`, a `UNet2DConditionModel` cross-attending to the `ClassEmbedder`
(1001 rows: classes 0..999 and the null class 1000) and DDIM with the checkpoint's own
noise schedule. The architecture is read from the weights' shapes; only what shapes do
not show is an argument (attention heads, latent size, latent scale factor).

The original is read with `torch.load(weights_only=True)` (or from a .safetensors file)
and the result is written as safetensors. Every key must be consumed and every parameter
filled with a tensor of the right shape; otherwise the conversion fails and lists the
keys, writing nothing.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from diffusers import UNet2DConditionModel, VQModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from qdiff.errors import QdiffError
from qdiff.models.class_embedder import ClassEmbedder
from qdiff.models.class_ldm_pipeline import ClassConditionalLDMPipeline

from .ldm_layout import UNET, VAE, Rule, UNetShape, VQShape, class_rules, map_key, unet_rules, vq_rules
from .ldm_schedule import SCHEDULE_BUFFERS, buffers_from_scheduler, scheduler_from_buffers

NORM_GROUPS = 32  # GroupNorm32 throughout latent-diffusion


class ConversionError(QdiffError, ValueError):
    """The checkpoint does not match the layout; the message lists the offending keys."""


@dataclass(frozen=True)
class LDMOptions:
    """What the weights do not say (defaults: cin256-v2)."""

    num_heads: int = 1
    latent_size: int = 64  # 256 px / 4
    scale_factor: float = 1.0  # LatentDiffusion's z scale (not stored unless scale_by_std)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a .ckpt (tensors only: weights_only=True) or a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as error:
            raise _unreadable(path, "safetensors", error) from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise _unreadable(path, "PyTorch", error) from None
        raise ConversionError(
            f"{path} holds Python objects besides tensors ({_first_sentence(error)}), which "
            f"qdiff does not unpickle. In an environment you trust, extract its tensors once: "
            f"python -c \"import torch; from safetensors.torch import save_file; "
            f"save_file(torch.load('{path.name}', weights_only=False)['state_dict'], "
            f"'{path.stem}.safetensors')\" and convert the .safetensors file.") from None
    except (RuntimeError, KeyError, EOFError, ValueError) as error:
        raise _unreadable(path, "PyTorch", error) from None
    return _state_dict(path, data)


def _first_sentence(error: Exception) -> str:
    return str(error).strip().split("\n")[0].split(". ")[0].rstrip(".")


def _unreadable(path: Path, kind: str, error: Exception) -> ConversionError:
    """A damaged or foreign file; the loader's own reason, shortened to its first sentence."""
    if isinstance(error, EOFError):
        reason = "the file ends early"
    elif isinstance(error, KeyError):
        reason = "neither a zip nor a pickle checkpoint"
    else:
        reason = _first_sentence(error)
    return ConversionError(f"{path} is not a readable {kind} checkpoint ({reason}); it may be "
                           f"truncated: compare its size and checksum with the original, or "
                           f"download it again.")


def _state_dict(path: Path, data: object) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by name (its `state_dict` entry, if it has one)."""
    state = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor)
                                              for value in state.values()):
        raise ConversionError(f"{path} holds no state dict of tensors (found "
                              f"{type(state).__name__}); give latent-diffusion's .ckpt (e.g. "
                              f"cin256-v2.ckpt) or a .safetensors file of its state_dict.")
    return dict(state)


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for key in state for m in [re.match(pattern, key)] if m}
    return max(found) + 1 if found else 0


def unet_shape(state: Mapping[str, torch.Tensor]) -> UNetShape:
    """Levels, blocks per level and attention from the input blocks' weights."""
    channels = state[f"{UNET}input_blocks.0.0.weight"].shape[0]
    prefix = re.escape(UNET)
    downsamplers = sorted(int(m.group(1)) for key in state
                          for m in [re.match(rf"{prefix}input_blocks\.(\d+)\.0\.op\.weight", key)] if m)
    blocks = (downsamplers[0] if downsamplers
              else _count(state, rf"{prefix}input_blocks\.(\d+)\.")) - 1
    mult, attention = [], []
    for level in range(len(downsamplers) + 1):
        first = 1 + level * (blocks + 1)
        mult.append(state[f"{UNET}input_blocks.{first}.0.out_layers.3.weight"].shape[0] // channels)
        attention.append(f"{UNET}input_blocks.{first}.1.proj_in.weight" in state)
    return UNetShape(channels, tuple(mult), blocks, tuple(attention))


def vq_shape(state: Mapping[str, torch.Tensor]) -> VQShape:
    levels = _count(state, rf"{re.escape(VAE)}encoder\.down\.(\d+)\.")
    return VQShape(levels, _count(state, rf"{re.escape(VAE)}encoder\.down\.0\.block\.(\d+)\."))


def build_pipeline(state: Mapping[str, torch.Tensor], options: LDMOptions) -> ClassConditionalLDMPipeline:
    """An empty pipeline of the checkpoint's architecture (weights filled by `convert`)."""
    shape, vq = unet_shape(state), vq_shape(state)
    middle = f"{UNET}middle_block.1.transformer_blocks"
    attends = shape.attention_levels
    unet = UNet2DConditionModel(
        sample_size=options.latent_size, in_channels=state[f"{UNET}input_blocks.0.0.weight"].shape[1],
        out_channels=state[f"{UNET}out.2.weight"].shape[0],
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attends[::-1]),
        block_out_channels=tuple(shape.model_channels * m for m in shape.channel_mult),
        layers_per_block=shape.num_res_blocks,
        cross_attention_dim=state[f"{middle}.0.attn2.to_k.weight"].shape[1],
        transformer_layers_per_block=_count(state, rf"{re.escape(middle)}\.(\d+)\."),
        attention_head_dim=options.num_heads,  # diffusers' name for the number of heads
        norm_num_groups=NORM_GROUPS)
    codes, code_dim = state[f"{VAE}quantize.embedding.weight"].shape
    vae = VQModel(
        in_channels=state[f"{VAE}encoder.conv_in.weight"].shape[1],
        out_channels=state[f"{VAE}decoder.conv_out.weight"].shape[0],
        down_block_types=("DownEncoderBlock2D",) * vq.levels,
        up_block_types=("UpDecoderBlock2D",) * vq.levels,
        block_out_channels=tuple(state[f"{VAE}encoder.down.{i}.block.0.conv1.weight"].shape[0]
                                 for i in range(vq.levels)),
        layers_per_block=vq.num_res_blocks,
        latent_channels=state[f"{VAE}encoder.conv_out.weight"].shape[0],
        num_vq_embeddings=codes, vq_embed_dim=code_dim, norm_num_groups=NORM_GROUPS,
        sample_size=options.latent_size * 2 ** (vq.levels - 1), scaling_factor=options.scale_factor)
    rows, dim = state["cond_stage_model.embedding.weight"].shape
    return ClassConditionalLDMPipeline(unet=unet, class_embedder=ClassEmbedder(rows - 1, dim), vae=vae,
                                       scheduler=scheduler_from_buffers(state))


COMPONENTS = ("unet", "vae", "class_embedder")


def layout(state: Mapping[str, torch.Tensor]) -> list[Rule]:
    """The key table of a checkpoint's architecture."""
    return unet_rules(unet_shape(state)) + vq_rules(vq_shape(state)) + class_rules()


def pipeline_layout(pipe: ClassConditionalLDMPipeline) -> list[Rule]:
    """The same table, read from a pipeline's configs (for the reverse mapping)."""
    unet, vae = pipe.unet.config, pipe.vae.config
    shape = UNetShape(unet.block_out_channels[0],
                      tuple(c // unet.block_out_channels[0] for c in unet.block_out_channels),
                      unet.layers_per_block, tuple(t.startswith("CrossAttn") for t in unet.down_block_types))
    return unet_rules(shape) + vq_rules(VQShape(len(vae.block_out_channels), vae.layers_per_block)) \
        + class_rules()


def pipeline_state(pipe: ClassConditionalLDMPipeline) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the pipeline, keyed `<component>.<name>`."""
    return {f"{name}.{key}": value for name in COMPONENTS
            for key, value in pipe.components[name].state_dict().items()}


def _listing(what: str, keys: list[str], limit: int = 20) -> str:
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} {what}: {', '.join(keys[:limit])}{more}."


def _remap(state: Mapping[str, torch.Tensor], rules: list[Rule], reverse: bool) -> dict[str, torch.Tensor]:
    mapped, unmapped = {}, []
    for key, tensor in state.items():
        target = map_key(key, rules, reverse)
        if target is None:
            unmapped.append(key)
            continue
        name, reshape = target
        if reshape:  # 1x1 conv (original) <-> linear (diffusers)
            tensor = tensor[:, :, None, None] if reverse else tensor.reshape(tensor.shape[:2])
        mapped[name] = tensor
    if unmapped:
        hint = (" EMA weights (model_ema.*) are not converted: extract either the EMA or the "
                "plain weights first." if any(k.startswith("model_ema") for k in unmapped) else "")
        raise ConversionError(_listing("keys no rule maps", sorted(unmapped)) + hint)
    return mapped


def _check_filled(mapped: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Every parameter filled, nothing left over, every shape right."""
    problems = []
    missing = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    wrong = sorted(f"{key} (checkpoint {tuple(mapped[key].shape)}, model {tuple(expected[key].shape)})"
                   for key in set(mapped) & set(expected) if mapped[key].shape != expected[key].shape)
    for what, keys in (("parameters not filled", missing), ("mapped keys the model lacks", extra),
                       ("shapes differ", wrong)):
        if keys:
            problems.append(_listing(what, keys))
    if problems:
        raise ConversionError("The checkpoint does not fit the architecture read from it: "
                              + " ".join(problems))


def convert(state: Mapping[str, torch.Tensor], options: LDMOptions = LDMOptions()
            ) -> ClassConditionalLDMPipeline:
    """The pipeline holding the checkpoint's weights; raises ConversionError on any mismatch."""
    try:
        pipe = build_pipeline(state, options)
    except KeyError as error:
        raise ConversionError(f"The checkpoint has no {error.args[0]}: it is not a "
                              f"latent-diffusion class-conditional LDM (the layout of "
                              f"cin256-v2.ckpt).") from None
    weights = {key: value for key, value in state.items() if key not in SCHEDULE_BUFFERS}
    mapped = _remap(weights, layout(state), reverse=False)
    _check_filled(mapped, pipeline_state(pipe))
    for name in COMPONENTS:
        prefix = f"{name}."
        pipe.components[name].load_state_dict(
            {key[len(prefix):]: value for key, value in mapped.items() if key.startswith(prefix)})
    return pipe


def to_original(pipe: ClassConditionalLDMPipeline) -> dict[str, torch.Tensor]:
    """The reverse mapping: the pipeline as a latent-diffusion state dict."""
    state = _remap(pipeline_state(pipe), pipeline_layout(pipe), reverse=True)
    return {**state, **buffers_from_scheduler(pipe.scheduler)}


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path,
                       options: LDMOptions = LDMOptions()) -> ClassConditionalLDMPipeline:
    """Read, convert, check and save; nothing is written unless every check passes.

    The folder is written beside `out_dir` and renamed into place once complete, so a run
    that fails (a full disk, Ctrl-C) leaves no half-written pipeline under that name.
    """
    pipe = convert(read_checkpoint(checkpoint), options)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial",
                                    dir=out_dir.parent))
    try:
        pipe.save_pretrained(partial, safe_serialization=True)
        os.replace(partial, out_dir)  # onto a missing or empty folder only
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return pipe
