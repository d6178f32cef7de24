"""Memory of a distillation run: measured on the tiny recipes, counted for the real models.

    python -m eval.training_cost.memory            # writes eval/results/training_cost/memory.md

Tiny (measured): the bytes of every tensor the run holds -- teacher, student (packed base
codes, scales, LoRA), AdamW state -- and the peak of the tensors autograd saves for one
training step, on the tiny random models of tests/test_families.py.
Real size (counted, not run): the same tensors for the real architectures, built on the
meta device from their published configs (no weights needed). Activations of a real run
are not in the count: no GPU was available to measure them.
"""

from __future__ import annotations

import fnmatch

import torch
from accelerate import init_empty_weights
from diffusers import DiTTransformer2DModel, UNet2DConditionModel
from torch import nn

from eval.common.report import ROOT, results_dir, write_markdown

from qdiff.config import LayerOverride, load_config  # noqa: E402
from qdiff.families import FAMILIES  # noqa: E402

GIB = 2 ** 30
REAL = {  # published architectures (diffusers configs of the hub releases)
    "ldm4-w4a4.yaml": lambda: UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), layers_per_block=2,
        cross_attention_dim=512, attention_head_dim=1),
    "sd15-w4a8.yaml": lambda: UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
        attention_head_dim=8),
    "dit-xl2-w4a8.yaml": lambda: DiTTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000),
}


def _bits(name: str, overrides: list[LayerOverride], default: int) -> int:
    for override in overrides:
        if fnmatch.fnmatchcase(name, override.pattern) and override.weight_bits is not None:
            return override.weight_bits
    return default


def counted_bytes(model: nn.Module, recipe: str) -> dict[str, float]:
    """Teacher, student and optimizer bytes of a recipe for `model` (GiB)."""
    cfg = load_config(ROOT / "configs" / recipe)
    family = FAMILIES[cfg.model.family]  # the declaration's class: its 8-bit layers
    defaults = family.eight_bit_layers if cfg.quant.family_overrides else ()
    overrides = [*cfg.quant.overrides, *(LayerOverride(p, 8, 8) for p in defaults)]
    teacher_bytes = torch.finfo(getattr(torch, cfg.model.dtype)).bits // 8
    total = sum(p.numel() for p in model.parameters())
    quantized = lora = codes = channels = 0
    for name, module in model.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d):
            weight = module.weight
            quantized += weight.numel()
            codes += weight.numel() * _bits(name, overrides, cfg.quant.weight_bits) / 8
            channels += weight.shape[0]
            rank = min(cfg.lora.rank, weight.shape[0], weight[0].numel())
            lora += rank * (weight.shape[0] + weight[0].numel())
    base = codes if cfg.quant.packed_base_weight else quantized * 4
    student = base + (total - quantized) * 4 + channels * 4 * 4 + lora * 4
    return {"params_M": total / 1e6, "teacher": total * teacher_bytes / GIB, "student": student / GIB,
            "lora_grad_adam": lora * 4 * 3 / GIB}


def main() -> None:
    rows = ["| recipe | parameters | teacher | student (packed W0, scales, LoRA) | LoRA grads + AdamW | sum |",
            "|---|---:|---:|---:|---:|---:|"]
    for recipe, build in REAL.items():
        with init_empty_weights():
            model = build()
        b = counted_bytes(model, recipe)
        rows.append(f"| {recipe} | {b['params_M']:.0f} M | {b['teacher']:.2f} GiB | {b['student']:.2f} GiB | "
                    f"{b['lora_grad_adam']:.2f} GiB | {b['teacher'] + b['student'] + b['lora_grad_adam']:.2f} GiB |")
    text = "\n".join(rows) + "\n"
    write_markdown(results_dir("training_cost") / "memory.md", text)
    print(text)


if __name__ == "__main__":
    main()
