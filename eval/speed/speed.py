"""Speed and memory of the exported W4A8 / W4A4 pipelines against their float teacher.

    python -m eval.speed              # -> eval/results/speed/speed.md, speed.json, speed.png
    python -m eval.speed --quick      # small sizes, few repeats: checks that it runs (own files)
    python -m eval.speed --no-bf16-sampling   # CPUs without bfloat16 instructions (see --help)
    python -m eval.speed --compile digits --report speed-avx512   # also compiled; own report name

Two models, each run side by side in one process: the embedded teacher
(assets/tiny-ldm-digits) and a Stable-Diffusion-1.5-sized `UNet2DConditionModel`
(block_out_channels 320/640/1280/1280, cross_attention_dim 768; 860 M random weights)
in a `StableDiffusionPipeline` with SD's VAE and CLIP-L text encoder shapes (random
weights, a character tokenizer) at a 32x32 latent (256x256 images). The low-bit
students are built as a run builds them (`quantize_`, calibration, `export_pipeline`,
`qdiff.load_pipeline`) with the time embedding, conv_in and conv_out at 8 bit; for the
SD-sized model the grids are min-max and calibrated on random inputs (speed does not
depend on the values). The low-bit pipelines run on their default kernel ("auto");
"W4A8 bf16" and "W4A4 bf16" are the same exports loaded with `dtype=torch.bfloat16` (their
float parts in bfloat16, the integer layers integer), timed where the CPU has bfloat16
instructions.

Timing: variants take turns within each repeat (so a change of the machine's load hits
all alike), after one untimed warm-up call each; ratios are per repeat, teacher time over
low-bit time (> 1: the low-bit pipeline is faster), reported as min / median / max.
Peak memory: in a fresh process per variant, the denoiser is loaded and run once (the
kernels' one-time preparation and measurement), then the peak resident memory of one
more forward, above the process's resident memory before the model was loaded; once with
glibc's default malloc and once with a fixed mmap threshold (see `ALLOCATORS`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch._inductor.config
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import qdiff
from eval.common.plotting import require_matplotlib
from eval.common.report import ROOT, machine, markdown_head, results_dir, write_json, write_markdown
from qdiff.calibrate import calibrate
from qdiff.config import LayerOverride, LoRAConfig, QuantConfig, load_config
from qdiff.export import export_pipeline
from qdiff.kernels import choices
from qdiff.quant import calibrating, quantize_, set_timesteps

RESULTS = results_dir("speed")
BITS = {"W4A8": (4, 8), "W4A4": (4, 4)}
TEACHERS = ("float32", "bfloat16", "float32 compiled")
MEMORY_VARIANTS = ("float32", "bfloat16", *BITS)
EIGHT_BIT = ("time_embedding.*", "conv_in", "conv_out")  # EfficientDM's higher-precision layers


@dataclass
class Case:
    """One model: its pipelines by variant, a denoiser call and a sampling call."""

    name: str
    pipes: dict
    forward: Callable  # (pipe) -> None: one denoiser forward on fixed inputs
    sample: Callable  # (pipe) -> None: one end-to-end sampling
    describe: str


# ---------------------------------------------------------------- the SD-sized model

def _sd_sizes(quick: bool) -> dict:
    if quick:  # SD's layout at a tenth of its width (text: 64 wide, 2 layers)
        return dict(channels=(32, 64, 128, 128), heads=8, context=64, latent=16, text_layers=2,
                    vae=(32, 32, 32, 32))
    return dict(channels=(320, 640, 1280, 1280), heads=8, context=768, latent=32, text_layers=12,
                vae=(128, 256, 512, 512))


def _tokenizer() -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no vocabulary file to download); 77 tokens as SD."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase:
        vocab.update({char: len(vocab), f"{char}</w>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_sd(quick: bool, width: float = 1.0) -> StableDiffusionPipeline:
    """SD-1.5's UNet / VAE / CLIP-L shapes with random weights (seeded); `width` scales the
    UNet's channels (a multiple of 32 each, for its group norms)."""
    s = _sd_sizes(quick)
    torch.manual_seed(0)
    channels = tuple(max(32, round(c * width / 32) * 32) for c in s["channels"])
    unet = UNet2DConditionModel(sample_size=s["latent"], in_channels=4, out_channels=4,
                                block_out_channels=channels, attention_head_dim=s["heads"],
                                cross_attention_dim=s["context"], layers_per_block=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=s["vae"],
                        down_block_types=("DownEncoderBlock2D",) * 4, layers_per_block=2,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=8 * s["latent"])
    tokenizer = _tokenizer()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=s["context"], projection_dim=s["context"],
        intermediate_size=4 * s["context"], num_hidden_layers=s["text_layers"], num_attention_heads=8,
        max_position_embeddings=77, pad_token_id=1, bos_token_id=0, eos_token_id=1))
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def sd_inputs(unet, dtype: torch.dtype, size: int | None = None) -> tuple:
    """One guided SD step on the UNet's device: a batch of 2 (prompt, empty prompt), 77 text
    tokens, a `size` x `size` latent (default: the UNet's sample size). Drawn on the CPU."""
    gen = torch.Generator().manual_seed(0)
    size = size or unet.config.sample_size
    sample = torch.randn(2, 4, size, size, generator=gen).to(unet.device, dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen).to(unet.device, dtype)
    return sample, torch.tensor([500, 500], device=unet.device), context


def sd_student(unet, bits: tuple[int, int], timesteps: torch.Tensor):
    """Min-max W/A grids calibrated on random inputs at `timesteps`."""
    overrides = [LayerOverride(pattern=p, weight_bits=8, act_bits=8) for p in EIGHT_BIT]
    cfg = QuantConfig(weight_bits=bits[0], act_bits=bits[1], weight_init="minmax", act_init="minmax",
                      overrides=overrides)
    student = copy.deepcopy(unet)
    quantize_(student, cfg, LoRAConfig(enabled=False))
    set_timesteps(student, timesteps)
    with torch.no_grad(), calibrating(student):
        for t in timesteps:
            sample, _, context = sd_inputs(unet, torch.float32)
            student(sample, t.to(sample.device).expand(2), encoder_hidden_states=context)
    return student, cfg


def sd_case(workdir: Path, quick: bool, steps: int) -> Case:
    pipe = build_sd(quick)
    pipe.scheduler.set_timesteps(steps)
    calibration = pipe.scheduler.timesteps[:: max(1, steps // 2)].float()
    pipes = {"float32": pipe}
    for name, bits in BITS.items():
        student, cfg = sd_student(pipe.unet, bits, calibration)
        pipes[name] = export_student(pipe, student, cfg, workdir / f"sd-{name}")
        del student
    add_bf16_exports(pipes, {name: workdir / f"sd-{name}" for name in BITS})
    pipes["bfloat16"] = copy.deepcopy(pipe).to(torch.bfloat16)
    size = 8 * pipe.unet.config.sample_size

    def sample(p):
        p(prompt="a photo of a cat", num_inference_steps=steps, guidance_scale=7.5, height=size,
          width=size, generator=torch.Generator().manual_seed(0), output_type="np")

    channels = "/".join(map(str, pipe.unet.config.block_out_channels))
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    return Case("sd15-unet", pipes, lambda p: _sd_forward(p.unet), sample,
                f"SD-1.5-shaped UNet ({channels}, {params:.0f} M parameters), latent "
                f"{pipe.unet.config.sample_size}x{pipe.unet.config.sample_size}, batch 2 (guidance), "
                f"sampling {steps} DDIM steps at {size}x{size}")


def _sd_forward(unet) -> None:
    sample, t, context = sd_inputs(unet, unet.dtype)
    unet(sample, t, encoder_hidden_states=context)


# ---------------------------------------------------------------- the embedded model

LABELS = [0, 1, 2, 3, 4, 5, 6, 7]


def digits_case(workdir: Path, steps: int, calibration_samples: int) -> Case:
    pipe = qdiff.load_pipeline(ROOT / "assets" / "tiny-ldm-digits")
    pipes = {"float32": pipe}
    for name in BITS:
        cfg = load_config(ROOT / "configs" / f"tiny-ldm-{name.lower()}.yaml")
        student = copy.deepcopy(pipe.unet)
        quantize_(student, cfg.quant, LoRAConfig(enabled=False))
        calibrate(student, pipe, calibration_samples, cfg.distill.trajectory_steps, cfg.distill.eta,
                  cfg.distill.guidance_scale, batch_size=calibration_samples, seed=cfg.seed)
        pipes[name] = export_student(pipe, student, cfg.quant, workdir / f"digits-{name}")
    add_bf16_exports(pipes, {name: workdir / f"digits-{name}" for name in BITS})
    pipes["bfloat16"] = copy.deepcopy(pipe).to(torch.bfloat16)

    inputs: dict[int, tuple] = {}  # per pipeline, made once: the forward times the denoiser only

    def forward(p):
        if id(p) not in inputs:
            inputs[id(p)] = digits_inputs(p)
        x, t, context = inputs[id(p)]
        p.unet(x, t, encoder_hidden_states=context)

    def sample(p):
        p(class_labels=LABELS, guidance_scale=2.0, num_inference_steps=steps,
          generator=torch.Generator().manual_seed(0), output_type="np")

    return Case("tiny-ldm-digits", pipes, forward, sample,
                f"the embedded teacher (2.5 M parameters), latent 8x8x3, batch 16 (8 labels, guidance), "
                f"sampling {steps} DDIM steps")


def digits_inputs(pipe) -> tuple:
    """One guided denoiser call of the embedded pipeline: (latents, timesteps, context) for
    the 8 labels and their unconditional halves, in the denoiser's dtype."""
    context = pipe.class_context(torch.tensor(LABELS), 2.0)
    x = torch.randn(len(context), 3, 8, 8, generator=torch.Generator().manual_seed(3)).to(pipe.unet.dtype)
    return x, torch.full((len(x),), 500), context


def export_student(pipe, student, quant_cfg: QuantConfig, folder: Path):
    export_pipeline(pipe, student, folder, quant_cfg)
    return _load(folder)


def _load(folder: Path, dtype: torch.dtype = torch.float32):
    loaded = qdiff.load_pipeline(folder, dtype=dtype)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def add_bf16_exports(pipes: dict, folders: dict[str, Path]) -> None:
    """Each export again with its float parts in bfloat16 (`dtype`), as "W4A8 bf16" and so
    on, where the CPU has bfloat16 instructions: the integer layers stay integer."""
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pipes.update({f"{name} bf16": _load(folder, torch.bfloat16) for name, folder in folders.items()})


# ---------------------------------------------------------------- measuring

def _seconds(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@torch.inference_mode()
def interleaved(variants: dict, call: Callable, repeats: int) -> dict[str, list[float]]:
    """Seconds of `call(variant)` per variant and repeat; the variants take turns within each
    repeat, after one untimed call each (the warm-up, and the low-bit kernels' one-time
    preparation and measurement)."""
    for variant in variants.values():
        call(variant)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, variant in variants.items():
            times[name].append(_seconds(lambda: call(variant)))
    return times


def low_bit(times: dict) -> list[str]:
    return [name for name in times if name not in TEACHERS]


def teachers(times: dict) -> list[str]:
    return [name for name in TEACHERS if name in times]


def ratio_summary(numerator: list[float], denominator: list[float]) -> dict:
    """numerator / denominator per repeat: min, median, max."""
    r = [n / d for n, d in zip(numerator, denominator)]
    return {"min": min(r), "median": statistics.median(r), "max": max(r)}


def ratios(times: dict[str, list[float]]) -> dict:
    """teacher / low-bit per repeat, min / median / max, for every (low-bit, teacher) pair."""
    return {f"{low} vs {teacher}": ratio_summary(times[teacher], times[low])
            for low in low_bit(times) for teacher in teachers(times)}


def add_compiled(case: Case, kernel: str) -> None:
    """The float32 teacher and the low-bit variants with their denoiser `torch.compile`d, the
    low-bit ones (a copy) set to `kernel` first."""
    torch._inductor.config.freezing = True  # the onednn kernel's prepacked weights must be constants
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for name in ("float32", *BITS):
        pipe = copy.copy(case.pipes[name])
        unet = pipe.unet if name == "float32" else copy.deepcopy(pipe.unet).set_qdiff_kernel(kernel)
        pipe.unet = torch.compile(unet, dynamic=False)
        case.pipes[f"{name} compiled"] = pipe


PROBE = """
import ctypes, gc, json, sys, torch
torch.set_num_threads(int(sys.argv[4]))
import qdiff
from diffusers import UNet2DConditionModel
from qdiff.export import QuantizedUNet2DConditionModel
from eval.common.memory import rss_bytes, reset_peak, peak_bytes
from eval.speed.speed import sd_inputs
base = rss_bytes()
folder, variant = sys.argv[1], sys.argv[2]
dtype = torch.bfloat16 if variant == "bfloat16" else torch.float32
cls = UNet2DConditionModel if variant in ("float32", "bfloat16") else QuantizedUNet2DConditionModel
unet = cls.from_pretrained(folder, dtype=dtype).eval()
with torch.inference_mode():
    sample, t, context = sd_inputs(unet, dtype)
    unet(sample, t, encoder_hidden_states=context)
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    resident = rss_bytes() - base
    reset_peak()
    unet(sample, t, encoder_hidden_states=context)
json.dump({"resident": resident, "peak": peak_bytes() - base}, open(sys.argv[3], "w"))
"""


# glibc's malloc raises its mmap threshold each time a large block is freed, so later blocks
# of that size come from the heap, where freed memory stays resident when fragmented. A fixed
# threshold (the environment variable; any value turns the adjustment off) returns every block
# of 1 MB or more to the system when it is freed: the peak is then the tensors' own.
ALLOCATORS = {"glibc default": {}, "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}


def peak_memory(folder: Path, variant: str, threads: int, workdir: Path, env: dict) -> dict:
    """Resident and peak-forward bytes of the denoiser in `folder`, in a fresh process
    whose environment adds `env`."""
    out = workdir / f"memory-{variant}.json"
    result = subprocess.run([sys.executable, "-c", PROBE, str(folder), variant, str(out), str(threads)],
                            capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe of {variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def sd_memory(case: Case, workdir: Path, threads: int) -> dict:
    folders = {name: workdir / f"sd-{name}" / "unet" for name in BITS}
    teacher = workdir / "sd-teacher-unet"
    case.pipes["float32"].unet.save_pretrained(teacher)
    folders.update({"float32": teacher, "bfloat16": teacher})
    return {allocator: {name: peak_memory(folders[name], name, threads, workdir, env)
                        for name in MEMORY_VARIANTS}
            for allocator, env in ALLOCATORS.items()}


# ---------------------------------------------------------------- report

def ratio_cell(r: dict) -> str:
    return f"**{r['median']:.2f}x** ({r['min']:.2f}-{r['max']:.2f})"


def report(results: dict, command: str, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{name}.json", {"command": command, **results})
    lines = markdown_head(
        "Speed of the exported low-bit pipelines against their float teacher", command, results["machine"],
        "Ratios: teacher time / low-bit time per repeat (> 1: the low-bit pipeline is faster), "
        "median (min-max) over repeats; the variants take turns within a repeat. Low-bit "
        "pipelines on the default kernel (\"auto\"). Seconds are medians.")
    for case in results["cases"]:
        lines += [f"## {case['name']}", "", case["describe"], ""]
        for measure in ("denoiser forward", "end-to-end sampling"):
            m = case[measure]
            variants = list(m["seconds"])
            lines += [f"{measure}:", "", "| | " + " | ".join(variants) + " |",
                      "|---|" + "---:|" * len(variants),
                      "| seconds (median) | " + " | ".join(
                          f"{statistics.median(m['seconds'][v]):.3f}" for v in variants) + " |"]
            for teacher in teachers(m["seconds"]):
                lines.append(f"| {teacher} time / this | " + " | ".join(
                    ratio_cell(m["ratios"][f"{v} vs {teacher}"]) if v in low_bit(m["seconds"]) else ""
                    for v in variants) + " |")
            if "bfloat16" not in m["seconds"]:
                lines += ["", "(bfloat16 not timed: `--no-bf16-sampling`)"]
            lines.append("")
        if "memory" in case:
            variants = MEMORY_VARIANTS
            lines += ["", "peak memory of one denoiser forward (every variant in a fresh process "
                      "under the same allocator setting):", "",
                      "| allocator | | " + " | ".join(variants) + " |", "|---|---|" + "---:|" * len(variants)]
            for allocator, mem in case["memory"].items():
                base = mem["float32"]["peak"]
                lines.append(f"| {allocator} | MB | " + " | ".join(
                    f"{mem[v]['peak'] / 1e6:,.0f}" for v in variants) + " |")
                lines.append("| | vs float32 | " + " | ".join(
                    f"{mem[v]['peak'] / base:.3f}" for v in variants) + " |")
            lines += ["", "Fixed mmap threshold: `MALLOC_MMAP_THRESHOLD_=1048576`, so glibc returns "
                      "every freed block of 1 MB or more; by default it keeps freed heap memory "
                      "resident when fragmented (`ALLOCATORS` in eval/speed/speed.py)."]
        lines += ["", f"Kernels \"auto\" picked: {case['kernels']}", ""]
    lines.append(f"![median speed-up over float32 and bfloat16]({name}.png)")
    write_markdown(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    plot(results, RESULTS / f"{name}.png")


def plot(results: dict, path: Path) -> None:
    """Median teacher-time / low-bit-time per case and measure, with min-max whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = results["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.5), squeeze=False)
    for ax, case in zip(axes[0], cases):
        labels, medians, errors = [], [], [[], []]
        for measure, short in (("denoiser forward", "forward"), ("end-to-end sampling", "sampling")):
            for key, r in case[measure]["ratios"].items():
                labels.append(f"{short}\n{key.replace(' vs ', ' / ')}")
                medians.append(r["median"])
                errors[0].append(r["median"] - r["min"])
                errors[1].append(r["max"] - r["median"])
        ax.barh(labels, medians, xerr=errors, color="tab:blue")
        ax.axvline(1.0, color="grey", linestyle=":")
        ax.set(title=case["name"], xlabel="teacher time / low-bit time (> 1: faster)")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure_case(case: Case, repeats: int, sample_repeats: int, compile_kernel: str | None,
                 bf16_sampling: bool) -> dict:
    """Sampling and forward times of every variant (with compiled ones on `compile_kernel`,
    if given; each compiles on its untimed first call), and the kernels "auto" picked."""
    choices_before = len(choices())
    if compile_kernel is not None:
        add_compiled(case, compile_kernel)
    for pipe in case.pipes.values():
        pipe.set_progress_bar_config(disable=True)
    sampled = {name: pipe for name, pipe in case.pipes.items() if bf16_sampling or name != "bfloat16"}
    sampling = interleaved(sampled, case.sample, sample_repeats)
    picked = list(choices().values())[choices_before:]
    forward = interleaved(case.pipes, case.forward, repeats)
    return {"name": case.name, "describe": case.describe,
            "denoiser forward": {"seconds": forward, "ratios": ratios(forward)},
            "end-to-end sampling": {"seconds": sampling, "ratios": ratios(sampling)},
            "kernels": {k: picked.count(k) for k in sorted(set(picked))}}


def _cpu_model() -> str:
    return machine()["cpu"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per variant")
    parser.add_argument("--models", default="digits,sd")
    parser.add_argument("--compile", nargs="?", const="digits,sd", default="",
                        help="models (default with the flag: both) whose float32 teacher and exports are also "
                             "timed torch.compile'd (minutes of compilation each)")
    parser.add_argument("--compile-kernel", default="float",
                        help="the exports' kernel when compiled (default \"float\": inductor turns its sums into "
                             "float GEMMs with the quantization fused around them; \"int8\" on large layers)")
    parser.add_argument("--report", default=None,
                        help="name of the report under eval/results/speed/ (default: speed, or speed-quick)")
    parser.add_argument("--no-bf16-sampling", dest="bf16_sampling", action="store_false",
                        help="time the bfloat16 teacher's denoiser forward only, not its sampling "
                             "(on a CPU without bfloat16 instructions it is many times slower than "
                             "float32: an hour of sampling)")
    args = parser.parse_args(argv)
    require_matplotlib("python -m eval.speed")
    torch.set_num_threads(args.threads)
    diffusers_logging.disable_progress_bar()
    repeats = args.repeats or (3 if args.quick else 7)
    results = {"machine": f"CPU ({torch.backends.cpu.get_cpu_capability()}, {_cpu_model()}), {args.threads} "
                          f"thread(s), torch {torch.__version__}", "cases": []}
    with tempfile.TemporaryDirectory(prefix="qdiff-speed-") as tmp:
        workdir = Path(tmp)
        if "digits" in args.models:
            case = digits_case(workdir, steps=20, calibration_samples=2)
            kernel = args.compile_kernel if "digits" in args.compile else None
            results["cases"].append(measure_case(case, repeats, max(2, repeats // 2), kernel, args.bf16_sampling))
            del case
        if "sd" in args.models:
            case = sd_case(workdir, args.quick, steps=4 if args.quick else 10)
            kernel = args.compile_kernel if "sd" in args.compile else None
            measured = measure_case(case, repeats, max(2, repeats // 2), kernel, args.bf16_sampling)
            measured["memory"] = sd_memory(case, workdir, args.threads)
            results["cases"].append(measured)
    command = "python -m eval.speed" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    name = args.report or ("speed-quick" if args.quick else "speed")
    report(results, command, name)
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
