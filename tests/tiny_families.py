"""Tiny random pipelines shaped like the real recipes' models (no downloads).

Stable Diffusion: UNet2DConditionModel + a character-level CLIP text encoder; DiT: a
learned-sigma DiTTransformer2DModel (out_channels = 2 x in_channels) like DiT-XL/2;
class-conditional Wan: qdiff's video pipeline around a WanTransformer3DModel (flow matching);
Wan and CogVideoX: diffusers' text-to-video pipelines with tiny T5 encoders and a word-level
tokenizer built in memory (no tokenizer file).

The 2024-2026 families (SDXL, SD3.5, FLUX.1-dev, Qwen-Image, Wan 2.2 TI2V-5B and I2V-A14B,
FLUX.2, HunyuanVideo 1.5, LTX-2) are diffusers' own pipeline and model classes with their real architecture options,
shrunk in width, depth and vocabulary; their text encoders are transformers' own (CLIP, T5,
Qwen2.5-VL, Mistral-3, ByT5, Gemma 3) with word- or character-level tokenizers built in memory.
"""

from __future__ import annotations

import string

import jinja2
import torch
from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLFlux2, \
    AutoencoderKLHunyuanVideo15, AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, \
    AutoencoderKLQwenImage, AutoencoderKLWan, ClassifierFreeGuidance, CogVideoXDDIMScheduler, \
    CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler, DiTPipeline, \
    DiTTransformer2DModel, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, \
    Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel, HunyuanVideo15Pipeline, \
    HunyuanVideo15Transformer3DModel, LTX2Pipeline, LTX2VideoTransformer3DModel, \
    QwenImagePipeline, QwenImageTransformer2DModel, SD3Transformer2DModel, \
    StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, \
    UNet2DConditionModel, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, \
    WanTransformer3DModel
from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
from tokenizers import Regex, Tokenizer
from tokenizers.decoders import ByteLevel as ByteLevelDecoder
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import ByteLevel, Sequence, Split, WhitespaceSplit
from tokenizers.processors import TemplateProcessing
from transformers import ByT5Tokenizer, CLIPTextConfig, CLIPTextModel, \
    CLIPTextModelWithProjection, CLIPTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, \
    Mistral3Config, Mistral3ForConditionalGeneration, PreTrainedTokenizerFast, Qwen2_5_VLConfig, \
    Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, \
    T5EncoderModel, UMT5Config, UMT5EncoderModel

from qdiff.models import ClassConditionalVideoPipeline, ClassEmbedder

PROMPTS = ["a red bus", "a cat on a bed", "two dogs", "a snowy road"]


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         norm_num_groups=4, sample_size=8).eval()


def tiny_clip_text(projection: bool = False
                   ) -> tuple[CLIPTextModel | CLIPTextModelWithProjection, CLIPTokenizer]:
    """A one-layer CLIP text encoder (width 16) with a character-level tokenizer; with its
    text projection (16) when `projection` (SDXL's second encoder, SD3's first two)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab.update({char: len(vocab), f"{char}</w>": len(vocab) + 1})
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    text_encoder = model_class(CLIPTextConfig(
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


# --- 2024-2026 families: the real diffusers pipelines and models, shrunk -----------------


def tiny_stable_diffusion_xl() -> StableDiffusionXLPipeline:
    """SDXL: a UNet with `text_time` added conditions (pooled text + size/crop ids), cross
    attention over both CLIP encoders' penultimate states (16 + 16), the second projected."""
    torch.manual_seed(0)
    text_encoder, tokenizer = tiny_clip_text()
    text_encoder_2, tokenizer_2 = tiny_clip_text(projection=True)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=32,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 16, norm_num_groups=4).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False)


def tiny_stable_diffusion_3() -> StableDiffusion3Pipeline:
    """SD3.5: an MMDiT with RMS qk-norm and a dual-attention (MMDiT-X) first block over two
    projected CLIP encoders; no T5 (`text_encoder_3=None`: the pipeline pads with zeros)."""
    torch.manual_seed(0)
    text_encoder, tokenizer = tiny_clip_text(projection=True)
    text_encoder_2, tokenizer_2 = tiny_clip_text(projection=True)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=32, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,),
        qk_norm="rms_norm").eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None)


def tiny_flux() -> FluxPipeline:
    """FLUX.1-dev: double- and single-stream blocks, guidance distilled (`guidance_embeds`),
    CLIP pooled + T5 sequence conditions, 2x2-packed latents."""
    torch.manual_seed(0)
    text_encoder, tokenizer = tiny_clip_text()
    tokenizer_2 = tiny_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=12, d_kv=4, d_ff=16,
                                             num_layers=1, num_heads=2)).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15)
    return FluxPipeline(scheduler=scheduler, vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
                 "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
                 "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen_tokenizer(texts: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Qwen2's byte-level pre-tokenization, chat special tokens and
    chat template, its vocabulary the pieces of `texts` (by default Qwen-Image's prompt template
    around the test prompts): the templates split into Qwen's own leading tokens, which the
    pipelines drop (Qwen-Image's `prompt_template_encode_start_idx`, 34)."""
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # Qwen's BPE has no single token for long runs of spaces: 4 at most (HunyuanVideo 1.5's
    # system prompt then splits into its 108 leading tokens, `prompt_template_encode_start_idx`)
    pre_tokenizer = Sequence([ByteLevel(add_prefix_space=False, use_regex=True),
                              Split(Regex("\u0120{4}"), behavior="isolated")])
    pieces = set()
    texts = texts or tuple(QWEN_TEMPLATE.format(prompt) for prompt in [*PROMPTS, " "])
    for text in texts:
        for part in text.replace("<|im_start|>", "<|im_end|>").split("<|im_end|>"):
            pieces.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(part))
    vocab = {token: index for index, token in enumerate([*special, "<unk>", *sorted(pieces)])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = ByteLevelDecoder()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", unk_token="<unk>",
                                   additional_special_tokens=special[1:],
                                   chat_template=QWEN_CHAT_TEMPLATE)


def tiny_qwen_image() -> QwenImagePipeline:
    """Qwen-Image: an MMDiT over 2x2-packed latents of a Qwen-Image (Wan-style causal 3-D) VAE,
    conditioned on the last hidden states of a one-layer Qwen2.5-VL (with its vision tower)."""
    torch.manual_seed(0)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=[1, 1, 2]),
                         bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                           out_hidden_size=16, fullatt_block_indexes=[0]))).eval()
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, shift_terminal=0.02,
        time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def tiny_wan22_ti2v() -> WanPipeline:
    """Wan 2.2 TI2V-5B: per-token timesteps (`expand_timesteps`), the Wan 2.2 VAE (residual
    blocks, 2x2 pixel patchify: 12 channels in, 48 latent channels, spatial factor 16)."""
    torch.manual_seed(0)
    base = tiny_wan()
    vae = AutoencoderKLWan(base_dim=4, decoder_base_dim=4, z_dim=48, dim_mult=[1, 1, 1, 1],
                           num_res_blocks=1, temperal_downsample=[False, True, True], is_residual=True,
                           in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                           scale_factor_temporal=4, latents_mean=[0.0] * 48,
                           latents_std=[1.0] * 48).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2,
                                        attention_head_dim=8, in_channels=48, out_channels=48,
                                        text_dim=12, freq_dim=16, ffn_dim=32, num_layers=1,
                                        rope_max_seq_len=32).eval()
    return WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=vae,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                         use_flow_sigmas=True, flow_shift=5.0),
                       transformer=transformer, expand_timesteps=True)


def tiny_wan22_i2v() -> WanImageToVideoPipeline:
    """Wan 2.2 I2V-A14B: two experts split at `boundary_ratio` 0.9 (`transformer` for the
    high-noise steps, `transformer_2` below), the image's VAE latents and a frame mask
    concatenated to the noisy latents (4 + 4 + 4 channels), no CLIP image encoder."""
    base = tiny_wan()
    torch.manual_seed(0)
    high_noise, low_noise = (WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=12,
        out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32, num_layers=1,
        rope_max_seq_len=32).eval() for _ in range(2))
    return WanImageToVideoPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=5.0),
        image_processor=None, image_encoder=None, transformer=high_noise, transformer_2=low_noise,
        boundary_ratio=0.9)


def tiny_image(size: int = 16):
    """A small deterministic RGB PIL image (a colour ramp) for image-to-video pipelines."""
    from PIL import Image

    ramp = torch.linspace(0, 255, size).to(torch.uint8)
    pixels = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                          ramp.flip(0)[None, :].expand(size, size)], dim=-1)
    return Image.fromarray(pixels.numpy())


FLUX2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "[SYSTEM_PROMPT] {{ message['content'][0]['text'] }} [/SYSTEM_PROMPT]"
    "{% else %}[INST] {{ message['content'][0]['text'] }} [/INST]{% endif %}{% endfor %}")


def tiny_mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Mistral's chat special tokens and a chat template in
    Mistral-Small-3's layout (system prompt, then the instruction) for FLUX.2's prompts."""
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE

    special = ["<pad>", "<s>", "</s>", "<unk>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]",
               "[/INST]", "[IMG]"]
    words = sorted({word for text in [*PROMPTS, SYSTEM_MESSAGE] for word in text.split()})
    vocab = {token: index for index, token in enumerate([*special, *words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=special[4:],
                                   chat_template=FLUX2_CHAT_TEMPLATE)


FLUX2_TEXT_LAYERS = (1, 2, 3)  # FLUX.2 stacks Mistral's layers 10, 20, 30; the tiny one has 3


def tiny_flux2() -> Flux2Pipeline:
    """FLUX.2 [dev]: a guidance-distilled DiT with 4-axis rotary positions over the 2x2-patchified
    latents of the FLUX.2 VAE (batch-norm latent statistics), conditioned on three stacked
    hidden layers of a three-layer Mistral-3 (with its Pixtral vision tower)."""
    torch.manual_seed(0)
    tokenizer = tiny_mistral_tokenizer()
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=16,
                         intermediate_size=16, num_hidden_layers=len(FLUX2_TEXT_LAYERS),
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=2, head_dim=8, patch_size=4,
                           image_size=16),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))).eval()
    vae = AutoencoderKLFlux2(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                             up_block_types=("UpDecoderBlock2D",), layers_per_block=1,
                             latent_channels=4, norm_num_groups=4, sample_size=8).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16 * len(FLUX2_TEXT_LAYERS),
        timestep_guidance_channels=16, mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=True).eval()
    return Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                         vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)


def tiny_wan22_ti2v_i2v() -> WanImageToVideoPipeline:
    """Wan 2.2 TI2V-5B conditioned on an image: `tiny_wan22_ti2v`'s models in the
    image-to-video pipeline, where the first latent frame is the image's (timestep 0 at its
    tokens, the step's timestep elsewhere)."""
    base = tiny_wan22_ti2v()
    return WanImageToVideoPipeline(
        tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
        scheduler=base.scheduler, image_processor=None, image_encoder=None,
        transformer=base.transformer, expand_timesteps=True)


def tiny_hunyuan_video15() -> HunyuanVideo15Pipeline:
    """HunyuanVideo 1.5 (text-to-video): a dual-stream DiT with a token refiner over a
    two-layer Qwen2.5-VL text model's third-to-last states and a ByT5 glyph encoder, the
    latents concatenated with (zero) image-condition latents and mask, the DC-AE style causal
    VAE (spatial 4, temporal 4 here), CFG through diffusers' guider (a call per branch)."""
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import format_text_input

    torch.manual_seed(0)
    system = HunyuanVideo15Pipeline._get_mllm_prompt_embeds.__defaults__[2]
    chats = [format_text_input([prompt], system)[0] for prompt in [*PROMPTS, ""]]
    template = jinja2.Template(QWEN_CHAT_TEMPLATE)
    tokenizer = tiny_qwen_tokenizer(tuple(template.render(messages=chat, add_generation_prompt=True)
                                          for chat in chats))
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, bos_token_id=0, eos_token_id=2,
        pad_token_id=0, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                             mrope_section=[1, 1, 2]))).eval()
    tokenizer_2 = ByT5Tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=12, d_kv=4,
                                             d_ff=16, num_layers=1, num_heads=2)).eval()
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8),
                                      layers_per_block=1, spatial_compression_ratio=4,
                                      temporal_compression_ratio=4).eval()
    vae.enable_slicing()  # 0.42.1's VAE attention mask (B, L, L) fails for B > 1: a sample at a time
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=12,
        image_embed_dim=16, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v").eval()
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, guider=ClassifierFreeGuidance(guidance_scale=6.0))
    # Shorter token sequences than the real 1000 text, 256 glyph and 729 (zero) image tokens:
    # the ByT5 projection's hidden width is fixed at 2048, so its tokens dominate the time
    pipe.tokenizer_max_length, pipe.tokenizer_2_max_length = 16, 8
    pipe.vision_num_semantic_tokens = 8
    return pipe


def tiny_ltx2() -> LTX2Pipeline:
    """LTX-2 (text to video with audio): the audio-video DiT over the latents of the LTX-2 video
    VAE (patch 2, two spatio-temporal levels: spatial 8, temporal 4) and the audio VAE's mel
    latents, conditioned through the text connectors on every hidden state of a one-layer
    Gemma 3 (with its SigLIP tower); a vocoder turns the mel spectrogram into audio. The
    pipeline's default guidance makes three calls per step: CFG batched (negative and
    positive), spatio-temporal guidance (block 0 perturbed), modality isolation."""
    torch.manual_seed(0)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, sliding_window=16, pad_token_id=0, bos_token_id=1,
                         eos_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4),
        mm_tokens_per_image=4, image_token_index=2, boi_token_index=2, eoi_token_index=2)).eval()
    connectors = LTX2TextConnectors(  # Gemma's 1 + 1 hidden states of width 16
        caption_channels=16, text_proj_in_factor=2, video_connector_num_attention_heads=2,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=4, audio_connector_num_attention_heads=2,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=4, connector_rope_base_seq_len=32,
        video_hidden_dim=16, audio_hidden_dim=16).eval()
    vae = AutoencoderKLLTX2Video(
        latent_channels=8, block_out_channels=(8, 16),
        down_block_types=("LTX2VideoDownBlock3D",) * 2, decoder_block_out_channels=(8, 16),
        layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        spatio_temporal_scaling=(True, True), decoder_spatio_temporal_scaling=(True, True),
        decoder_inject_noise=(False, False, False),
        downsample_type=("spatiotemporal", "spatiotemporal"),
        upsample_type=("spatiotemporal", "spatiotemporal"), upsample_residual=(True, True),
        upsample_factor=(2, 2), patch_size=2, patch_size_t=1).eval()
    audio_vae = AutoencoderKLLTX2Audio(  # base_channels = latent channels x latent mel bins
        base_channels=16, output_channels=2, ch_mult=(1, 2), num_res_blocks=1, in_channels=2,
        latent_channels=4, mel_bins=16).eval()
    vocoder = LTX2Vocoder(in_channels=32, hidden_channels=8, out_channels=2,
                          upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
                          resnet_kernel_sizes=[3], resnet_dilations=[[1]],
                          output_sampling_rate=16000).eval()
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, vae_scale_factors=(4, 8, 8), audio_in_channels=16,
        audio_out_channels=16, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=1, caption_channels=16).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
        base_image_seq_len=1024, max_image_seq_len=4096, shift_terminal=0.1)
    return LTX2Pipeline(scheduler=scheduler, vae=vae, audio_vae=audio_vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, connectors=connectors, transformer=transformer,
                        vocoder=vocoder)
