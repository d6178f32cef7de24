"""Tiny random pipelines shaped like the real recipes' models (no downloads).

Stable Diffusion: UNet2DConditionModel + a character-level CLIP text encoder; DiT: a
learned-sigma DiTTransformer2DModel (out_channels = 2 x in_channels) like DiT-XL/2.
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, \
    StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PROMPTS = ["a red bus", "a cat on a bed", "two dogs", "a snowy road"]


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, sample_size=8).eval()


def tiny_clip_text() -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A one-layer CLIP text encoder (width 16) with a character-level tokenizer."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab.update({char: len(vocab), f"{char}</w>": len(vocab) + 1})
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=8, projection_dim=16, pad_token_id=1,
        bos_token_id=0, eos_token_id=1)).eval()
    return text_encoder, CLIPTokenizer(vocab=vocab, merges=[], model_max_length=8)


def tiny_stable_diffusion() -> StableDiffusionPipeline:
    torch.manual_seed(0)
    text_encoder, tokenizer = tiny_clip_text()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4,
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        norm_num_groups=4).eval()
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, unet=unet, scheduler=DDIMScheduler(),
        tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def tiny_dit() -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                        out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=1000)
    return DiTPipeline(transformer=transformer.eval(), vae=tiny_vae(), scheduler=DDIMScheduler())
