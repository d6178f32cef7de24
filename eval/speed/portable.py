"""Speed of the portable export (torchao) beside float32, bfloat16 and qdiff's own export,
eager and compiled; and what a user's LoRA costs on an export.

    python -m eval.speed.portable            # -> eval/results/speed/portable.md and .json
    python -m eval.speed.portable --quick    # small sizes, few repeats (own files: -quick)
    python -m eval.speed.portable --models sd --parts lora --report portable-lora   # the LoRA alone

Two denoisers, each W4A8 with per-token int8 activations at clip ratio 1 (what
`configs/tiny-ldm-w4a8-torchao.yaml` trains, so both exports compute the same layers):

- the embedded teacher's UNet (2.5 M parameters), batch 16 (8 labels, guidance), the
  recipe's 8-bit layers, calibrated on two teacher trajectories;
- the SD-1.5-sized UNet of eval.speed.speed (860 M random weights), batch 2, 32x32
  latent, min-max grids calibrated on random inputs (speed does not depend on the values).

Variants, all in one process: the float teacher in float32 and bfloat16; qdiff's export
(integer kernels, "auto"); the portable export loaded by stock diffusers in float32 and in
bfloat16 (diffusers' default for torchao); each eager and under `torch.compile`. Timing:
the variants take turns within each repeat after an untimed warm-up (eval.speed.speed's
`interleaved`); a ratio is float32 time / the variant's time per repeat, median (min-max).

LoRA (SD-sized UNet, eager): a random rank-32 LoRA on every attention projection, feed-forward
and proj_in/proj_out Linear (diffusers' `add_adapter`, PEFT), on the float32 teacher and on
qdiff's export (its float branch beside each integer layer, `qdiff.export.lora`); the
ratio is the forward time with the LoRA over without, per repeat. Only these four models
are held in memory while it is timed (`--parts lora` runs it alone).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch._inductor.config
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging

import qdiff
from eval.common.report import (ROOT, command_line, machine, markdown_head, results_dir, write_json,
                                write_markdown)
from eval.speed.export import folder_bytes
from eval.speed.speed import build_sd, interleaved, ratio_cell, ratio_summary, sd_inputs
from qdiff.calibrate import calibrate
from qdiff.config import LayerOverride, LoRAConfig, QuantConfig, load_config
from qdiff.export import export_pipeline, quantized_class_for
from qdiff.quant import calibrating, quantize_, set_timesteps

RESULTS = results_dir("speed")
RECIPE = ROOT / "configs" / "tiny-ldm-w4a8-torchao.yaml"
LORA_RANK = 32
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]


@dataclass
class Model:
    """One denoiser: its variants by name and the inputs of one forward, by dtype."""

    name: str
    describe: str
    variants: dict[str, torch.nn.Module]
    inputs: Callable[[torch.dtype], dict]
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of each form's folder


def _dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if "bfloat16" in name else torch.float32


def add_exports(model: Model, teacher: torch.nn.Module, student: torch.nn.Module, pipe,
                quant: QuantConfig, workdir: Path) -> None:
    """qdiff's export and the portable one of `student`, loaded back as their users load them."""
    native = export_pipeline(pipe, student, workdir / f"{model.name}-qdiff", quant)
    portable = export_pipeline(pipe, student, workdir / f"{model.name}-torchao", quant, format="torchao")
    teacher_dir = workdir / f"{model.name}-float32"
    teacher.save_pretrained(teacher_dir)
    model.sizes = {"float32": folder_bytes(teacher_dir), "qdiff W4A8": folder_bytes(native / "unet"),
                   "torchao W4A8": folder_bytes(portable / "unet")}
    model.variants["qdiff W4A8"] = quantized_class_for(student).from_pretrained(native / "unet").eval()
    for dtype in ("float32", "bfloat16"):
        model.variants[f"torchao W4A8 {dtype}"] = UNet2DConditionModel.from_pretrained(
            portable / "unet", dtype=_dtype(dtype)).eval()


def digits_model(workdir: Path) -> Model:
    pipe = qdiff.load_pipeline(ROOT / "assets" / "tiny-ldm-digits")
    pipe.set_progress_bar_config(disable=True)
    cfg = load_config(RECIPE)
    student = copy.deepcopy(pipe.unet)
    quantize_(student, cfg.quant, LoRAConfig(enabled=False))
    calibrate(student, pipe, 2, cfg.distill.trajectory_steps, cfg.distill.eta,
              cfg.distill.guidance_scale, batch_size=2, seed=cfg.seed)
    context = pipe.class_context(torch.arange(8), cfg.distill.guidance_scale)
    sample = torch.randn(len(context), 3, 8, 8, generator=torch.Generator().manual_seed(3))

    def inputs(dtype: torch.dtype) -> dict:
        return {"sample": sample.to(dtype), "timestep": torch.full((len(sample),), 500),
                "encoder_hidden_states": context.to(dtype)}

    model = Model("tiny-ldm-digits", "the embedded teacher's UNet (2.5 M parameters), latent 8x8x3, "
                  "batch 16 (8 labels, guidance)",
                  {"float32": pipe.unet, "bfloat16": copy.deepcopy(pipe.unet).to(torch.bfloat16)}, inputs)
    add_exports(model, pipe.unet, student, pipe, cfg.quant, workdir)
    return model


def sd_model(workdir: Path, quick: bool) -> Model:
    pipe = build_sd(quick)
    unet = pipe.unet
    overrides = [LayerOverride(pattern=p, weight_bits=8, act_bits=8)
                 for p in ("time_embedding.*", "conv_in", "conv_out")]
    quant = QuantConfig(weight_bits=4, act_bits=8, act_mode="dynamic_per_token", act_init="minmax",
                        act_timestep_groups=1, weight_init="minmax", overrides=overrides)
    student = copy.deepcopy(unet)
    quantize_(student, quant, LoRAConfig(enabled=False))
    timesteps = torch.tensor([500.0])
    set_timesteps(student, timesteps)
    with torch.no_grad(), calibrating(student):
        sample, t, context = sd_inputs(unet, torch.float32)
        student(sample, t, encoder_hidden_states=context)

    def inputs(dtype: torch.dtype) -> dict:
        sample, t, context = sd_inputs(unet, dtype)
        return {"sample": sample, "timestep": t, "encoder_hidden_states": context}

    params = sum(p.numel() for p in unet.parameters()) / 1e6
    channels = "/".join(map(str, unet.config.block_out_channels))
    model = Model("sd15-unet", f"SD-1.5-shaped UNet ({channels}, {params:.0f} M parameters), latent "
                  f"{unet.config.sample_size}x{unet.config.sample_size}, batch 2 (guidance)",
                  {"float32": unet, "bfloat16": copy.deepcopy(unet).to(torch.bfloat16)}, inputs)
    add_exports(model, unet, student, pipe, quant, workdir)
    del student
    return model


def forwards(variants: dict[str, torch.nn.Module], inputs: Callable[[torch.dtype], dict],
             repeats: int, inner: int) -> dict[str, list[float]]:
    """Seconds per forward, per variant and repeat (the mean of `inner` forwards), the
    variants taking turns (`eval.speed.speed.interleaved`)."""
    args = {name: inputs(_dtype(name)) for name in variants}

    def run(name: str) -> None:
        for _ in range(inner):
            variants[name](**args[name])

    times = interleaved({name: name for name in variants}, run, repeats)
    return {name: [seconds / inner for seconds in values] for name, values in times.items()}


def ratios(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """baseline time / variant time per repeat: min, median, max."""
    return {name: ratio_summary(times[baseline], seconds) for name, seconds in times.items()}


def compiled(variants: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Each variant under torch.compile (weights frozen as constants, as for inference)."""
    torch._inductor.config.freezing = True  # onednn's prepacked weights must be constants
    # one forward per variant, all sharing the denoiser class's code: static shapes, and room
    # in dynamo's cache for every variant (else later ones compile with symbolic shapes)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(variants))
    return {f"{name} compiled": torch.compile(model, dynamic=False) for name, model in variants.items()}


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with a random rank-32 LoRA on `LORA_TARGETS` (non-zero B)."""
    from peft import LoraConfig

    lora = copy.deepcopy(model)
    torch.manual_seed(0)
    lora.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS,
                                init_lora_weights=False))
    return lora.eval()


def measure(model: Model, repeats: int, inner: int, parts: set[str]) -> dict:
    """The `parts` ("eager", "compiled", "lora") of one model, in that order."""
    result = {"name": model.name, "describe": model.describe, "sizes": model.sizes}
    if "eager" in parts:
        eager = forwards(model.variants, model.inputs, repeats, inner)
        result["eager"] = {"seconds": eager, "ratios": ratios(eager, "float32")}
    if "compiled" in parts:
        times = forwards(compiled(model.variants), model.inputs, repeats, inner)
        result["compiled"] = {"seconds": times, "ratios": ratios(times, "float32 compiled")}
        torch._dynamo.reset()  # the compiled graphs hold frozen copies of every weight
    if "lora" in parts:
        names = ("float32", "qdiff W4A8")
        for name in set(model.variants) - set(names):  # only what the LoRA pairs need in memory
            del model.variants[name]
        gc.collect()
        pairs = {}
        for name in names:
            pairs[name] = model.variants[name]
            pairs[f"{name} + LoRA"] = with_lora(model.variants[name])
        times = forwards(pairs, model.inputs, repeats, inner)
        result["lora"] = {"seconds": times, "ratios": {
            name: ratio_summary(times[f"{name} + LoRA"], times[name]) for name in names}}
    return result


def report(results: dict, command: str, stem: str) -> None:
    write_json(RESULTS / f"{stem}.json", results, command)
    lines = markdown_head(
        "The portable export (torchao) beside float32, bfloat16 and qdiff's export", command,
        results["machine"],
        "Seconds per denoiser forward (median over repeats; the variants take turns within "
        "each repeat). Ratio: float32 time / this variant's time, per repeat, median (min-max) "
        "(> 1: faster than float32); the compiled table's baseline is float32 compiled.")
    for case in results["models"]:
        lines += [f"## {case['name']}", "", case["describe"] + ".", ""]
        for mode in ("eager", "compiled"):
            if mode not in case:
                continue
            m = case[mode]
            lines += [f"{mode}:", "", "| variant | seconds | vs float32 |", "|---|---:|---:|"]
            for name, seconds in m["seconds"].items():
                lines.append(f"| {name} | {statistics.median(seconds):.4f} | {ratio_cell(m['ratios'][name])} |")
            lines.append("")
        sizes = case["sizes"]
        lines += ["denoiser folder size: " + ", ".join(
            f"{name} {size / 2**20:.1f} MiB ({size / sizes['float32']:.2f}x)" for name, size in sizes.items()), ""]
        if "lora" in case:
            lora = case["lora"]
            lines += [f"a rank-{LORA_RANK} LoRA on {', '.join(LORA_TARGETS)} (eager):", "",
                      "| | seconds without | seconds with | time with / without |", "|---|---:|---:|---:|"]
            for name, r in lora["ratios"].items():
                lines.append(f"| {name} | {statistics.median(lora['seconds'][name]):.4f} | "
                             f"{statistics.median(lora['seconds'][name + ' + LoRA']):.4f} | {ratio_cell(r)} |")
            lines.append("")
    write_markdown(RESULTS / f"{stem}.md", "\n".join(lines) + "\n", command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    parser.add_argument("--models", default="digits,sd")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--parts", default="eager,compiled,lora",
                        help="what to time: eager, compiled, lora (the SD-sized model only)")
    parser.add_argument("--report", default="portable", help="write eval/results/speed/REPORT.md and .json")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= {"eager", "compiled", "lora"}:
        parser.error(f"--parts takes eager, compiled, lora; not {sorted(parts - {'eager', 'compiled', 'lora'})}")
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()  # the torchao loader's bfloat16 advice, once per load
    repeats = args.repeats or (2 if args.quick else 7)
    results = {"machine": f"CPU ({torch.backends.cpu.get_cpu_capability()}, "
                          f"{machine()['cpu']}), {torch.get_num_threads()} thread(s), torch "
                          f"{torch.__version__}", "models": []}
    with tempfile.TemporaryDirectory(prefix="qdiff-portable-") as tmp:
        if "digits" in args.models:
            model = digits_model(Path(tmp))
            results["models"].append(measure(model, repeats, 1 if args.quick else 20, parts - {"lora"}))
            print(results["models"][-1], flush=True)
        if "sd" in args.models:
            model = sd_model(Path(tmp), args.quick)
            results["models"].append(measure(model, repeats, 1, parts))
            print(results["models"][-1], flush=True)
    stem = args.report + ("-quick" if args.quick else "")
    report(results, command_line(), stem)
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
