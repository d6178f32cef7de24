"""A synthetic latent-diffusion checkpoint (cin256-v2 layout, tiny sizes, random values).

Written module by module as openaimodel's UNetModel, taming's VQModel and the
ClassEmbedder build their state dicts -- independently of qdiff's conversion table.
"""

from __future__ import annotations

import numpy as np
import torch

from qdiff.convert.ldm import LDMOptions

CH, MULT, BLOCKS, ATTENTION_DS, CONTEXT, CLASSES = 32, (1, 2), 1, (2,), 16, 10
VQ_CH, VQ_MULT, Z, CODES = 32, (1, 2), 3, 16


def _norm(p, c):
    return {f"{p}.weight": (c,), f"{p}.bias": (c,)}


def _layer(p, *shape, bias=True):
    return {f"{p}.weight": shape, **({f"{p}.bias": (shape[0],)} if bias else {})}


def _resblock(p, cin, cout, emb):
    keys = {**_norm(f"{p}.in_layers.0", cin), **_layer(f"{p}.in_layers.2", cout, cin, 3, 3),
            **_layer(f"{p}.emb_layers.1", cout, emb), **_norm(f"{p}.out_layers.0", cout),
            **_layer(f"{p}.out_layers.3", cout, cout, 3, 3)}
    return {**keys, **(_layer(f"{p}.skip_connection", cout, cin, 1, 1) if cin != cout else {})}


def _spatial_transformer(p, c):
    b = f"{p}.transformer_blocks.0"
    return {**_norm(f"{p}.norm", c), **_layer(f"{p}.proj_in", c, c, 1, 1),
            **{f"{b}.attn{i}.to_{x}.weight": (c, CONTEXT if i == 2 and x != "q" else c)
               for i in (1, 2) for x in "qkv"},
            **_layer(f"{b}.attn1.to_out.0", c, c), **_layer(f"{b}.attn2.to_out.0", c, c),
            **_layer(f"{b}.ff.net.0.proj", 8 * c, c), **_layer(f"{b}.ff.net.2", c, 4 * c),
            **_norm(f"{b}.norm1", c), **_norm(f"{b}.norm2", c), **_norm(f"{b}.norm3", c),
            **_layer(f"{p}.proj_out", c, c, 1, 1)}


def _unet(u="model.diffusion_model"):
    """openaimodel.UNetModel(use_spatial_transformer=True, num_classes=None)."""
    emb = 4 * CH
    keys = {**_layer(f"{u}.time_embed.0", emb, CH), **_layer(f"{u}.time_embed.2", emb, emb),
            **_layer(f"{u}.input_blocks.0.0", CH, 3, 3, 3)}
    chans, ch, ds, index = [CH], CH, 1, 0
    for level, mult in enumerate(MULT):
        for _ in range(BLOCKS):
            index += 1
            keys.update(_resblock(f"{u}.input_blocks.{index}.0", ch, mult * CH, emb))
            ch = mult * CH
            if ds in ATTENTION_DS:
                keys.update(_spatial_transformer(f"{u}.input_blocks.{index}.1", ch))
            chans.append(ch)
        if level != len(MULT) - 1:
            index += 1
            keys.update(_layer(f"{u}.input_blocks.{index}.0.op", ch, ch, 3, 3))
            chans.append(ch)
            ds *= 2
    keys.update({**_resblock(f"{u}.middle_block.0", ch, ch, emb),
                 **_spatial_transformer(f"{u}.middle_block.1", ch),
                 **_resblock(f"{u}.middle_block.2", ch, ch, emb)})
    index = 0
    for level, mult in list(enumerate(MULT))[::-1]:
        for i in range(BLOCKS + 1):
            keys.update(_resblock(f"{u}.output_blocks.{index}.0", ch + chans.pop(), CH * mult, emb))
            ch, position = CH * mult, 1
            if ds in ATTENTION_DS:
                keys.update(_spatial_transformer(f"{u}.output_blocks.{index}.1", ch))
                position = 2
            if level and i == BLOCKS:
                keys.update(_layer(f"{u}.output_blocks.{index}.{position}.conv", ch, ch, 3, 3))
                ds //= 2
            index += 1
    return {**keys, **_norm(f"{u}.out.0", ch), **_layer(f"{u}.out.2", 3, CH, 3, 3)}


def _vq_resnet(p, cin, cout):
    keys = {**_norm(f"{p}.norm1", cin), **_layer(f"{p}.conv1", cout, cin, 3, 3),
            **_norm(f"{p}.norm2", cout), **_layer(f"{p}.conv2", cout, cout, 3, 3)}
    return {**keys, **(_layer(f"{p}.nin_shortcut", cout, cin, 1, 1) if cin != cout else {})}


def _vq_mid(p, c):
    return {**_vq_resnet(f"{p}.block_1", c, c), **_norm(f"{p}.attn_1.norm", c),
            **{k: v for x in ("q", "k", "v", "proj_out") for k, v in _layer(f"{p}.attn_1.{x}", c, c, 1, 1).items()},
            **_vq_resnet(f"{p}.block_2", c, c)}


def _vq(v="first_stage_model"):
    """taming VQModel with Encoder/Decoder(ch_mult=VQ_MULT, attn_resolutions=[])."""
    keys = _layer(f"{v}.encoder.conv_in", VQ_CH, 3, 3, 3)
    block_in = VQ_CH
    for level, mult in enumerate(VQ_MULT):
        for j in range(BLOCKS):
            keys.update(_vq_resnet(f"{v}.encoder.down.{level}.block.{j}", block_in, VQ_CH * mult))
            block_in = VQ_CH * mult
        if level != len(VQ_MULT) - 1:
            keys.update(_layer(f"{v}.encoder.down.{level}.downsample.conv", block_in, block_in, 3, 3))
    keys.update({**_vq_mid(f"{v}.encoder.mid", block_in), **_norm(f"{v}.encoder.norm_out", block_in),
                 **_layer(f"{v}.encoder.conv_out", Z, block_in, 3, 3),
                 **_layer(f"{v}.quant_conv", Z, Z, 1, 1), f"{v}.quantize.embedding.weight": (CODES, Z),
                 **_layer(f"{v}.post_quant_conv", Z, Z, 1, 1),
                 **_layer(f"{v}.decoder.conv_in", block_in, Z, 3, 3), **_vq_mid(f"{v}.decoder.mid", block_in)})
    for level in reversed(range(len(VQ_MULT))):
        for j in range(BLOCKS + 1):
            keys.update(_vq_resnet(f"{v}.decoder.up.{level}.block.{j}", block_in, VQ_CH * VQ_MULT[level]))
            block_in = VQ_CH * VQ_MULT[level]
        if level != 0:
            keys.update(_layer(f"{v}.decoder.up.{level}.upsample.conv", block_in, block_in, 3, 3))
    return {**keys, **_norm(f"{v}.decoder.norm_out", block_in), **_layer(f"{v}.decoder.conv_out", 3, block_in, 3, 3)}


def _schedule():
    """DDPM.register_schedule("linear", 0.0015, 0.0195): float64 numpy, stored as float32."""
    betas = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=np.float64) ** 2
    cumprod = np.cumprod(1.0 - betas)
    previous = np.append(1.0, cumprod[:-1])
    variance = betas * (1.0 - previous) / (1.0 - cumprod)
    values = {"betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": previous,
              "sqrt_alphas_cumprod": np.sqrt(cumprod), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - cumprod),
              "log_one_minus_alphas_cumprod": np.log(1.0 - cumprod),
              "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / cumprod),
              "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / cumprod - 1),
              "posterior_variance": variance,
              "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
              "posterior_mean_coef1": betas * np.sqrt(previous) / (1.0 - cumprod),
              "posterior_mean_coef2": (1.0 - previous) * np.sqrt(1.0 - betas) / (1.0 - cumprod)}
    return {key: torch.tensor(value, dtype=torch.float32) for key, value in values.items()}


def synthetic_checkpoint() -> dict[str, torch.Tensor]:
    """A tiny cin256-v2-shaped state dict: UNet, VQ-f4-style first stage, class embedder."""
    gen = torch.Generator().manual_seed(0)
    shapes = {**_unet(), **_vq(), "cond_stage_model.embedding.weight": (CLASSES + 1, CONTEXT)}
    state = {key: torch.randn(shape, generator=gen) * 0.1 for key, shape in shapes.items()}
    return {**state, **_schedule()}


OPTIONS = LDMOptions(num_heads=1, latent_size=8)
