"""The key layout of latent-diffusion's LDM checkpoints, as one table read both ways.

A `Rule` pairs a module of the original (`model.diffusion_model.input_blocks.1.0`) with
its diffusers counterpart (`unet.down_blocks.0.resnets.0`) and the renames of the leaves
inside it (`in_layers.2` <-> `conv1`). The table is built from the architecture (channel
multipliers, blocks per level, which levels attend), so it lists every module once;
converting a key is a longest-prefix lookup in one direction, and the reverse mapping is
the same lookup in the other. Nothing is guessed from substrings.

Original layout (CompVis latent-diffusion): openaimodel `UNetModel` (`time_embed`,
`input_blocks.N.{0 ResBlock | 0.op Downsample | 1 SpatialTransformer}`, `middle_block`,
`output_blocks.N.{0 ResBlock | 1 SpatialTransformer | 1/2.conv Upsample}`, `out`), the
first stage `VQModel` (taming `Encoder`/`Decoder` with `down.i.block.j`, `up.i.block.j`
numbered from the lowest resolution up, `mid.block_1/attn_1/block_2`; `quantize`,
`quant_conv`, `post_quant_conv`) and the `ClassEmbedder` (`cond_stage_model.embedding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

UNET, VAE, CLASSES = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."

# (original leaf, diffusers leaf, 1x1 conv in the original <-> linear in diffusers)
Leaf = tuple[str, str, bool]
UNET_RESNET: tuple[Leaf, ...] = (
    ("in_layers.0", "norm1", False), ("in_layers.2", "conv1", False),
    ("emb_layers.1", "time_emb_proj", False), ("out_layers.0", "norm2", False),
    ("out_layers.3", "conv2", False), ("skip_connection", "conv_shortcut", False))
VQ_RESNET: tuple[Leaf, ...] = (
    ("norm1", "norm1", False), ("conv1", "conv1", False), ("norm2", "norm2", False),
    ("conv2", "conv2", False), ("nin_shortcut", "conv_shortcut", False))
VQ_ATTENTION: tuple[Leaf, ...] = (
    ("norm", "group_norm", False), ("q", "to_q", True), ("k", "to_k", True), ("v", "to_v", True),
    ("proj_out", "to_out.0", True))


@dataclass(frozen=True)
class Rule:
    original: str  # module path in the original checkpoint
    diffusers: str  # module path in the pipeline, prefixed by its component
    leaves: Optional[tuple[Leaf, ...]] = None  # None: the names inside are the same


@dataclass(frozen=True)
class UNetShape:
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[bool, ...]  # per level: does it hold SpatialTransformers


@dataclass(frozen=True)
class VQShape:
    levels: int
    num_res_blocks: int


def unet_rules(shape: UNetShape) -> list[Rule]:
    """openaimodel UNetModel <-> UNet2DConditionModel, block by block."""
    u, d = UNET, "unet."
    rules = [Rule(f"{u}time_embed.0", f"{d}time_embedding.linear_1"),
             Rule(f"{u}time_embed.2", f"{d}time_embedding.linear_2"),
             Rule(f"{u}input_blocks.0.0", f"{d}conv_in")]
    levels, index = len(shape.channel_mult), 0
    for level in range(levels):
        for block in range(shape.num_res_blocks):
            index += 1
            rules.append(Rule(f"{u}input_blocks.{index}.0", f"{d}down_blocks.{level}.resnets.{block}",
                              UNET_RESNET))
            if shape.attention_levels[level]:
                rules.append(Rule(f"{u}input_blocks.{index}.1",
                                  f"{d}down_blocks.{level}.attentions.{block}"))
        if level != levels - 1:
            index += 1
            rules.append(Rule(f"{u}input_blocks.{index}.0.op",
                              f"{d}down_blocks.{level}.downsamplers.0.conv"))
    rules += [Rule(f"{u}middle_block.0", f"{d}mid_block.resnets.0", UNET_RESNET),
              Rule(f"{u}middle_block.1", f"{d}mid_block.attentions.0"),
              Rule(f"{u}middle_block.2", f"{d}mid_block.resnets.1", UNET_RESNET)]
    index = 0
    for up in range(levels):
        level = levels - 1 - up
        for block in range(shape.num_res_blocks + 1):
            rules.append(Rule(f"{u}output_blocks.{index}.0", f"{d}up_blocks.{up}.resnets.{block}",
                              UNET_RESNET))
            position = 1
            if shape.attention_levels[level]:
                rules.append(Rule(f"{u}output_blocks.{index}.1",
                                  f"{d}up_blocks.{up}.attentions.{block}"))
                position = 2
            if level != 0 and block == shape.num_res_blocks:
                rules.append(Rule(f"{u}output_blocks.{index}.{position}.conv",
                                  f"{d}up_blocks.{up}.upsamplers.0.conv"))
            index += 1
    rules += [Rule(f"{u}out.0", f"{d}conv_norm_out"), Rule(f"{u}out.2", f"{d}conv_out")]
    return rules


def _vq_middle(part: str) -> list[Rule]:
    o, d = f"{VAE}{part}.mid.", f"vae.{part}.mid_block."
    return [Rule(f"{o}block_1", f"{d}resnets.0", VQ_RESNET),
            Rule(f"{o}attn_1", f"{d}attentions.0", VQ_ATTENTION),
            Rule(f"{o}block_2", f"{d}resnets.1", VQ_RESNET)]


def vq_rules(shape: VQShape) -> list[Rule]:
    """taming VQModel <-> diffusers VQModel; the decoder's levels count the other way."""
    o, d = VAE, "vae."
    rules = [Rule(f"{o}encoder.conv_in", f"{d}encoder.conv_in")]
    for level in range(shape.levels):
        for block in range(shape.num_res_blocks):
            rules.append(Rule(f"{o}encoder.down.{level}.block.{block}",
                              f"{d}encoder.down_blocks.{level}.resnets.{block}", VQ_RESNET))
        if level != shape.levels - 1:
            rules.append(Rule(f"{o}encoder.down.{level}.downsample.conv",
                              f"{d}encoder.down_blocks.{level}.downsamplers.0.conv"))
    rules += _vq_middle("encoder")
    rules += [Rule(f"{o}encoder.norm_out", f"{d}encoder.conv_norm_out"),
              Rule(f"{o}encoder.conv_out", f"{d}encoder.conv_out"),
              Rule(f"{o}quant_conv", f"{d}quant_conv"),
              Rule(f"{o}quantize.embedding", f"{d}quantize.embedding"),
              Rule(f"{o}post_quant_conv", f"{d}post_quant_conv"),
              Rule(f"{o}decoder.conv_in", f"{d}decoder.conv_in")]
    rules += _vq_middle("decoder")
    for up in range(shape.levels):
        level = shape.levels - 1 - up
        for block in range(shape.num_res_blocks + 1):
            rules.append(Rule(f"{o}decoder.up.{level}.block.{block}",
                              f"{d}decoder.up_blocks.{up}.resnets.{block}", VQ_RESNET))
        if level != 0:
            rules.append(Rule(f"{o}decoder.up.{level}.upsample.conv",
                              f"{d}decoder.up_blocks.{up}.upsamplers.0.conv"))
    rules += [Rule(f"{o}decoder.norm_out", f"{d}decoder.conv_norm_out"),
              Rule(f"{o}decoder.conv_out", f"{d}decoder.conv_out")]
    return rules


def class_rules() -> list[Rule]:
    return [Rule(f"{CLASSES}embedding", "class_embedder.embedding")]


def _split(key: str, prefix: str) -> Optional[str]:
    """The rest of `key` after module `prefix` (None if `key` is not inside it)."""
    return key[len(prefix) + 1:] if key.startswith(prefix + ".") else None


def map_key(key: str, rules: list[Rule], reverse: bool = False) -> Optional[tuple[str, bool]]:
    """(mapped key, needs a 1x1-conv <-> linear reshape), or None if no rule covers `key`.

    `reverse` maps a diffusers key back to the original layout with the same rules.
    """
    matches = []
    for rule in rules:
        source, target = (rule.diffusers, rule.original) if reverse else (rule.original, rule.diffusers)
        rest = _split(key, source)
        if rest is not None:
            matches.append((len(source), rest, target, rule.leaves))
    if not matches:
        return None
    _, rest, target, leaves = max(matches, key=lambda match: match[0])
    if leaves is None:
        return f"{target}.{rest}", False
    for original, diffusers, reshape in leaves:
        leaf_source, leaf_target = (diffusers, original) if reverse else (original, diffusers)
        tail = _split(rest, leaf_source)
        if tail is not None:
            return f"{target}.{leaf_target}.{tail}", reshape and tail == "weight"
    return None
