"""Memory of a distillation at real size, counted on the meta device for the 2026 families.

    python -m eval.memory            # writes eval/results/memory/real-size.md and .json

For each family the denoiser is built from its published diffusers config
(eval/memory/architectures/<name>.json) on the meta device -- shapes, no storage, no
download -- and its parameter count checked against the model card's. Its recipe
(configs/<recipe>.yaml, read with plain `yaml.safe_load` into qdiff's config dataclasses,
so the family name need not be one `qdiff.config` accepts yet) gives the quantization and
LoRA settings; `eval.memory.count` counts the bytes with qdiff's own layer selection:

- teacher: the denoiser in bf16 (`model.dtype`);
- student: packed base codes, scales and activation tables of the quantized layers, and the
  rest of the denoiser in float32 (`build_student` trains a float32 copy);
- LoRA + AdamW: LoRA (and Phi where the recipe has it) in float32, the gradients and two
  AdamW moments of everything trained (LoRA, Phi, step sizes);
- text encoders and VAE in bf16, a separate column: they can sit in CPU memory during
  distillation (the prompts are encoded once per trajectory, the VAE only decodes sample
  grids), so the total leaves them out.

Activations are not counted (they depend on the batch, the video size and
`distill.gradient_checkpointing`, which every recipe here turns on); the total is what is
resident before the first forward pass.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from eval.common.report import ROOT, results_dir, write_json, write_markdown
from eval.memory.count import GB, StudentBytes, build_meta, encoder_bytes, parameter_count, \
    student_bytes, teacher_bytes
from qdiff.config import AuxConfig, DistillConfig, LayerOverride, LoRAConfig, QuantConfig
from qdiff.families import FAMILIES as FAMILY_DECLARATIONS

ARCHITECTURE_DIR = Path(__file__).resolve().parent / "architectures"
ARCHITECTURES = {path.stem: path for path in sorted(ARCHITECTURE_DIR.glob("*.json"))}
GPU_GB = 80.0

# --- the frozen components, built on the meta device from their published configs --------


def _umt5_xxl_encoder():
    from transformers import UMT5Config, UMT5EncoderModel
    return UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240,
                                       num_layers=24, num_heads=64, feed_forward_proj="gated-gelu"))


def _t5_xxl_encoder():
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                   num_heads=64, feed_forward_proj="gated-gelu"))


def _clip_l(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                            projection_dim=768, hidden_act="quick_gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _clip_bigg():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu"))


def _wan21_vae():
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan()  # diffusers' defaults are Wan 2.1's VAE (Qwen-Image reuses it)


def _wan22_vae():
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4],
                            num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True],
                            is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                            scale_factor_temporal=4, scale_factor_spatial=16)


def _sd_vae(latent_channels: int):
    from diffusers import AutoencoderKL
    sixteen = latent_channels == 16  # FLUX / SD3: no quant convs
    return AutoencoderKL(latent_channels=latent_channels, block_out_channels=[128, 256, 512, 512],
                         down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
                         use_quant_conv=not sixteen, use_post_quant_conv=not sixteen)


QWEN25_VL_7B = 8_292_166_656  # Qwen2.5-VL-7B-Instruct, vision tower included (its model card)


@dataclass(frozen=True)
class Component:
    name: str
    build: Optional[Callable[[], torch.nn.Module]] = None  # built on the meta device
    params: Optional[int] = None  # stated where not built

    def parameters(self) -> int:
        if self.params is not None:
            return self.params
        with torch.device("meta"):
            return parameter_count(self.build())


UMT5 = Component("UMT5-XXL encoder", _umt5_xxl_encoder)
T5 = Component("T5-XXL encoder", _t5_xxl_encoder)


@dataclass(frozen=True)
class Family:
    name: str  # the row's label
    family: str  # qdiff's model.family of the recipe
    pipeline: str  # the diffusers pipeline class
    architecture: str  # eval/memory/architectures/<architecture>.json
    recipe: Optional[str]  # configs/<recipe>; None: the reference row uses wan2.1-t2v-1.3b-w4a4.yaml
    published_params: float  # the model card's figure for one denoiser
    published: str  # how the card states it
    counted_params: int  # the meta build's exact count (pinned by tests/test_memory_count.py)
    components: tuple[Component, ...] = ()
    experts: int = 1  # Wan 2.2 A14B: two denoisers, one resident at a time
    tolerance: float = 0.05  # |counted - published| / published allowed

    @property
    def recipe_path(self) -> Path:
        return ROOT / "configs" / (self.recipe or "wan2.1-t2v-1.3b-w4a4.yaml")


FAMILIES = (
    Family("Wan 2.2 T2V-A14B", "wan", "WanPipeline (transformer + transformer_2)", "wan2.2-t2v-a14b",
           "wan2.2-t2v-a14b-w4a4.yaml", 14e9, "A14B: 27B total, 14B active per step",
           14_288_491_584, (UMT5, Component("Wan 2.1 VAE", _wan21_vae)), experts=2),
    Family("Wan 2.2 TI2V-5B", "wan", "WanPipeline", "wan2.2-ti2v-5b", "wan2.2-ti2v-5b-w4a4.yaml",
           5e9, "5B", 4_999_787_712, (UMT5, Component("Wan 2.2 VAE", _wan22_vae))),
    Family("Qwen-Image", "qwen-image", "QwenImagePipeline", "qwen-image", "qwen-image-w4a4.yaml",
           20e9, "20B MMDiT", 20_430_401_088,
           (Component("Qwen2.5-VL-7B", params=QWEN25_VL_7B), Component("Qwen-Image VAE", _wan21_vae))),
    Family("FLUX.1-dev", "flux", "FluxPipeline", "flux1-dev", "flux1-dev-w4a4.yaml", 12e9,
           "12 billion parameter rectified flow transformer", 11_901_408_320,
           (Component("CLIP-L", _clip_l), T5, Component("FLUX VAE", lambda: _sd_vae(16)))),
    Family("SD3.5 Large", "sd3", "StableDiffusion3Pipeline", "sd3.5-large", "sd3.5-large-w4a4.yaml",
           8.1e9, "8.1 billion parameter MMDiT", 8_056_627_520,
           (Component("CLIP-L", lambda: _clip_l(True)), Component("OpenCLIP bigG", _clip_bigg), T5,
            Component("SD3 VAE", lambda: _sd_vae(16)))),
    Family("SDXL base", "sdxl", "StableDiffusionXLPipeline", "sdxl-base", "sdxl-w4a4.yaml", 2.6e9,
           "2.6B UNet (SDXL paper)", 2_567_463_684,
           (Component("CLIP-L", _clip_l), Component("OpenCLIP bigG", _clip_bigg),
            Component("SDXL VAE", lambda: _sd_vae(4)))),
    # Wan 2.1's card names it 1.3B; diffusers' transformer holds 1.42B (the card rounds the
    # transformer blocks' size), hence the wider tolerance
    Family("Wan 2.1 T2V-1.3B (reference)", "wan", "WanPipeline", "wan2.1-t2v-1.3b", None, 1.3e9,
           "1.3B", 1_418_996_800, (UMT5, Component("Wan 2.1 VAE", _wan21_vae)), tolerance=0.10),
)


@dataclass
class Recipe:
    quant: QuantConfig
    lora: LoRAConfig
    aux: AuxConfig
    distill: DistillConfig
    raw: dict = field(default_factory=dict)


def read_recipe(path: Path) -> Recipe:
    """A recipe's quant / lora / aux / distill blocks through qdiff's dataclasses (their own
    checks run), without `load_config`'s model block (whose family list may not have the
    family yet). `extends` is followed."""
    raw = yaml.safe_load(path.read_text())
    if "extends" in raw:
        base = read_recipe(path.parent / raw.pop("extends")).raw
        for key, value in raw.items():
            base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
        raw = base
    quant = dict(raw.get("quant", {}))
    quant["overrides"] = [LayerOverride(**o) for o in quant.get("overrides", [])]
    distill = {k: v for k, v in raw.get("distill", {}).items()}
    return Recipe(QuantConfig(**quant), LoRAConfig(**raw.get("lora", {})),
                  AuxConfig(**raw.get("aux", {})), DistillConfig(**distill), raw)


def count_family(family: Family) -> dict:
    """One row: every byte count of the family's recipe at real size."""
    recipe = read_recipe(family.recipe_path)
    model = build_meta(json.loads(ARCHITECTURES[family.architecture].read_text()))
    params = parameter_count(model)
    quant_cfg = FAMILY_DECLARATIONS[family.family].quant_config(recipe.quant)
    student: StudentBytes = student_bytes(
        model, quant_cfg, recipe.lora, recipe.aux, table_entries=recipe.distill.trajectory_steps,
        train_weight_scales=recipe.distill.weight_scale_lr > 0)
    teacher = teacher_bytes(model, getattr(torch, recipe.raw.get("model", {}).get("dtype", "bfloat16")))
    components = [(c.name, c.parameters()) for c in family.components]
    encoders = sum(encoder_bytes(n) for _, n in components)
    adapters = student.adapters_with_adamw * family.experts  # every expert's, resident
    total = teacher + student.frozen_part + adapters
    build_peak = teacher + teacher_bytes(model, torch.float32)  # + its float32 copy
    return {
        "family": family.name, "qdiff_family": family.family, "pipeline": family.pipeline,
        "architecture": f"eval/memory/architectures/{family.architecture}.json",
        "recipe": str(family.recipe_path.relative_to(ROOT)),
        "denoiser_params": params, "experts": family.experts,
        "published": family.published, "published_params": family.published_params,
        "quantized_layers": student.quantized_layers, "float_layers": student.float_layers,
        "lora_rank": recipe.lora.rank, "aux_rank": recipe.aux.rank if recipe.aux.enabled else 0,
        "components": [{"name": n, "params": p} for n, p in components],
        "bytes": {
            "teacher": teacher, "student": student.frozen_part, "student_codes": student.codes,
            "student_quantizer_tables": student.quantizer_tables,
            "student_float": student.other_float + student.biases,
            "lora": student.lora, "aux": student.aux, "optimizer": student.optimizer,
            "adapters_with_adamw_per_expert": student.adapters_with_adamw,
            "adapters_with_adamw": adapters, "total": total,
            "encoders_vae_bf16": encoders, "total_with_encoders": total + encoders,
            "inactive_expert_adapters": adapters - student.adapters_with_adamw,
            "build_student_peak": build_peak,
        },
        "fits_80gb": total <= GPU_GB * GB,
        "fits_80gb_with_encoders": total + encoders <= GPU_GB * GB,
        "fits_80gb_build": build_peak <= GPU_GB * GB,
    }


def _gb(value: int) -> str:
    return f"{value / GB:.1f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Memory of a W4A4 distillation at real size (counted on the meta device)", "",
        "Command: `python -m eval.memory`. Nothing is allocated or downloaded: each denoiser is "
        "built from its published diffusers config on the meta device "
        "([architectures](../../memory/architectures/README.md)), its recipe's quant / LoRA "
        "settings read from `configs/`, and the bytes counted with qdiff's own layer selection "
        "(`eval/memory/count.py`; tests/test_memory_count.py checks the count against real "
        "quantized students to the byte). GB = 10^9 bytes.", "",
        "| family | diffusers pipeline | denoiser params | teacher bf16 GB | student GB | "
        "LoRA+AdamW GB | total GB | fits 80 GB | encoders+VAE bf16 GB (offloadable) | "
        "build_student peak GB |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        b = row["bytes"]
        params = f"{row['denoiser_params'] / 1e9:.2f}B" + (f" x {row['experts']}" if row["experts"] > 1 else "")
        fits = "yes" if row["fits_80gb"] else "no"
        fits += "" if row["fits_80gb_with_encoders"] else " (not with encoders resident)"
        lines.append(
            f"| {row['family']} | {row['pipeline']} | {params} | {_gb(b['teacher'])} | "
            f"{_gb(b['student'])} | {_gb(b['adapters_with_adamw'])} | {_gb(b['total'])} | {fits} | "
            f"{_gb(b['encoders_vae_bf16'])} | {_gb(b['build_student_peak'])} |")
    lines += ["", "Columns:", "",
              "- teacher: the denoiser in bf16, all of it (`cast_teacher` is `.to(bfloat16)`, "
              "`_keep_in_fp32_modules` included).",
              "- student: the quantized layers' packed 4-bit codes (two a byte; the family's 8-bit "
              "layers one a byte), their float32 base scales / zero points, weight step sizes and "
              "activation tables, their biases, and every layer not quantized, in float32: "
              "`build_student` deep-copies the teacher and calls `.float()`. LoRA not included.",
              "- LoRA+AdamW: LoRA A and B (and QVGen's Phi where the recipe enables `aux`, at its "
              "initial rank) in float32, plus a gradient and two AdamW moments for each, and for "
              "the trained step sizes (a few MB).",
              "- total = teacher + student + LoRA+AdamW, on the GPU. **Activations are not counted** "
              "(batch, resolution and `distill.gradient_checkpointing`, on in every recipe, decide "
              "them): what is left of 80 GB is what the forward / backward pass may use.",
              "- encoders+VAE: the text encoder(s) and VAE in bf16 ("
              + "; ".join(sorted({f"{c['name']} {c['params'] / 1e9:.3f}B" for r in rows
                                  for c in r["components"]})) +
              "). They can be offloaded to CPU memory during distillation: the prompts are encoded "
              "once per trajectory and the VAE only decodes sample grids. Not in the total. Note "
              "that qdiff today loads the pipeline in float32 and moves every component to the "
              "device (`pipe.to(accelerator.device)`), so they sit there at twice this column.",
              "- build_student peak: `build_student` deep-copies the (device-resident) bf16 teacher "
              "and casts the copy to float32 before `quantize_` packs it, so for a moment the "
              "teacher and a float32 copy of the whole denoiser (4 bytes a parameter) are both "
              "resident.",
              "",
              "Over 80 GB in the last column: "
              + (", ".join(r["family"] for r in rows if not r["fits_80gb_build"]) or "none")
              + ". Those runs need the student built otherwise (each layer cast to float32 and "
              "packed in turn, or the copy made on the CPU) before they can start on one GPU; "
              "the steady state above fits.",
              "",
              "Wan 2.2 T2V-A14B: two experts (high-noise `transformer`, low-noise `transformer_2`), "
              "each 14.3B, take the denoising steps above / below the boundary timestep; one teacher "
              "and one student expert are resident at a time (the other pair in CPU memory). The "
              "LoRA+AdamW column counts **both** experts' adapters and optimizer state on the GPU "
              "(the conservative case); keeping the inactive expert's in CPU memory saves "
              + ", ".join(f"{_gb(r['bytes']['inactive_expert_adapters'])} GB" for r in rows
                          if r["experts"] > 1) + ".",
              ""]
    lines += ["| family | recipe | quantized / float layers | LoRA rank | Phi rank | codes GB | "
              "tables GB | float part GB | LoRA GB | Phi GB | grads + AdamW GB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        b = row["bytes"]
        lines.append(
            f"| {row['family']} | {row['recipe']} | {row['quantized_layers']} / {row['float_layers']} | "
            f"{row['lora_rank']} | {row['aux_rank'] or '-'} | {_gb(b['student_codes'])} | "
            f"{b['student_quantizer_tables'] / GB:.3f} | {_gb(b['student_float'])} | "
            f"{_gb(b['lora'])} | {_gb(b['aux'])} | {_gb(b['optimizer'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.memory", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    rows = []
    for family in FAMILIES:
        rows.append(count_family(family))
        b = rows[-1]["bytes"]
        print(f"{family.name}: total {_gb(b['total'])} GB", flush=True)
    out = results_dir("memory")
    write_json(out / "real-size.json", {"gpu_gb": GPU_GB, "gb": GB, "rows": rows})
    write_markdown(out / "real-size.md", markdown(rows))


if __name__ == "__main__":
    main()
