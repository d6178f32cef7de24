"""Tiny random pipelines shaped like the real recipes' models (no downloads).

Stable Diffusion: UNet2DConditionModel + a character-level CLIP text encoder; DiT: a
learned-sigma DiTTransformer2DModel (out_channels = 2 x in_channels) like DiT-XL/2;
class-conditional Wan: qdiff's video pipeline around a WanTransformer3DModel (flow matching);
Wan and CogVideoX: diffusers' text-to-video pipelines with tiny T5 encoders and a word-level
tokenizer built in memory (no tokenizer file).
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLWan, \
    CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler, \
    DiTPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline, \
    UNet2DConditionModel, WanPipeline, WanTransformer3DModel
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerFast, \
    T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from qdiff.models import ClassConditionalVideoPipeline, ClassEmbedder

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


def tiny_class_wan() -> ClassConditionalVideoPipeline:
    """4 frames of 8x8, one grey channel, a one-block Wan transformer of width 16."""
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                        attention_head_dim=8, in_channels=1, out_channels=1,
                                        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=1,
                                        rope_max_seq_len=32)
    return ClassConditionalVideoPipeline(
        transformer=transformer.eval(), class_embedder=ClassEmbedder(10, 12).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), num_frames=4, height=8, width=8)


def tiny_t5_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (lower-case words of the test prompts, </s>, <pad>, <unk>)."""
    words = sorted({word for prompt in PROMPTS for word in prompt.split()})
    vocab = {token: index for index, token in enumerate(["<pad>", "</s>", "<unk>", *words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=16)


def tiny_wan() -> WanPipeline:
    """WanPipeline: a one-layer UMT5 encoder (width 12), a one-block Wan transformer over
    4 latent channels, and a Wan VAE of base width 3 (spatial factor 8, temporal 4)."""
    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=12, d_kv=4, d_ff=16,
                                               num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                           latents_std=[1.0] * 4).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                        attention_head_dim=8, in_channels=4, out_channels=4,
                                        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=1,
                                        rope_max_seq_len=32).eval()
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)


def tiny_cogvideox(rotary: bool = True) -> CogVideoXPipeline:
    """CogVideoXPipeline: a one-layer T5 encoder, a one-block transformer (3-D rotary
    positions as CogVideoX-5B when `rotary`), a 4-level CogVideoX VAE of width 8."""
    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=12, d_kv=4, d_ff=16,
                                           num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3,
                                 down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4,
                                 block_out_channels=(8, 8, 8, 8), latent_channels=4,
                                 layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4).eval()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        time_embed_dim=8, text_embed_dim=12, num_layers=1, sample_width=2, sample_height=2,
        sample_frames=5, patch_size=2, max_text_seq_length=226,  # the pipeline pads prompts to 226
        use_rotary_positional_embeddings=rotary).eval()
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                       timestep_spacing="trailing", snr_shift_scale=3.0)
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                             transformer=transformer, scheduler=scheduler)
