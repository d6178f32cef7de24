"""The exported low-bit SD-sized denoiser on a CUDA GPU: same numbers, speed and memory.

    python -m eval.speed.cuda            # -> eval/results/speed/speed-cuda.md, speed-cuda.json
    python -m eval.speed.cuda --quick    # SD's layout at a tenth of its width (own files)

Needs a GPU (the project's tests never do). The model is eval/speed/speed.py's
Stable-Diffusion-1.5-sized `UNet2DConditionModel` (860 M random weights, seeded), quantized
to W4A8 and W4A4 with min-max grids calibrated on random inputs, exported and loaded as a
run does, all on the GPU. Then, for each low-bit denoiser and kernel ("int8": `_int_mm`;
"float": the exact float64 sum; "auto": the faster per layer shape):

- the largest deviation of its output from the export's reference kernel on the GPU,
  relative to the output's largest value (float rounding only; the CPU tests pin 1e-5);
- the denoiser forward time at 256x256 and 512x512 images (32x32 and 64x64 latents, batch 2
  for guidance): the variants take turns within each repeat, after a warm-up call each
  (the "auto" kernel measures there), with CUDA synchronisation; ratios are teacher time
  over low-bit time per repeat, median (min-max);
- its weight memory on the GPU (parameters and buffers) and the peak memory one forward
  adds above it (`torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from eval.common.report import results_dir, write_json, write_markdown
from eval.speed.speed import (
    BITS,
    build_sd,
    export_student,
    ratio_cell,
    ratios,
    sd_inputs,
    sd_student,
)

RESULTS = results_dir("speed")
KERNELS = ("int8", "float", "auto")
LATENTS = (32, 64)


def forward(unet, size: int) -> torch.Tensor:
    sample, t, context = sd_inputs(unet, unet.dtype, size)
    return unet(sample, t, encoder_hidden_states=context).sample


def seconds(unet, size: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    forward(unet, size)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def weight_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def forward_peak_bytes(unet, size: int) -> int:
    """Peak memory one forward adds to what is allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward(unet, size)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def build(quick: bool, workdir: Path) -> dict:
    """{variant: denoiser on the GPU}: the float32 and bfloat16 teachers and one exported
    low-bit denoiser per width ("W4A8", "W4A4"), whose kernel each measurement sets."""
    pipe = build_sd(quick)
    pipe.unet.to("cuda")
    pipe.scheduler.set_timesteps(10)
    calibration = pipe.scheduler.timesteps[::5].float()
    variants = {"float32": pipe.unet, "bfloat16": copy.deepcopy(pipe.unet).to(torch.bfloat16)}
    for name, bits in BITS.items():
        student, cfg = sd_student(pipe.unet, bits, calibration)
        variants[name] = export_student(pipe, student, cfg, workdir / name).unet.to("cuda")
        del student
    return variants


@torch.inference_mode()
def deviations(low_bit: dict) -> dict:
    """{width: {kernel: max |output - reference| / max |reference|}} at the 32x32 latent."""
    out = {}
    for name, unet in low_bit.items():
        unet.set_qdiff_kernel("reference")
        expected = forward(unet, LATENTS[0]).float()
        out[name] = {}
        for kernel in KERNELS:
            unet.set_qdiff_kernel(kernel)
            got = forward(unet, LATENTS[0]).float()
            out[name][kernel] = float((got - expected).abs().max() / expected.abs().max())
    return out


@torch.inference_mode()
def timings(variants: dict, low_bit: dict, size: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per variant ("W4A8 int8", ...) and repeat; the variants take turns."""
    calls = {name: (unet, None) for name, unet in variants.items() if name not in low_bit}
    calls.update({f"{name} {kernel}": (unet, kernel) for name, unet in low_bit.items() for kernel in KERNELS})

    def run(unet, kernel) -> float:
        if kernel is not None:
            unet.set_qdiff_kernel(kernel)
        return seconds(unet, size)

    for unet, kernel in calls.values():
        run(unet, kernel)  # warm-up: cuBLAS handles, "auto"'s measurements
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (unet, kernel) in calls.items():
            times[name].append(run(unet, kernel))
    return times


@torch.inference_mode()
def memory(variants: dict, low_bit: dict, size: int) -> dict:
    out = {}
    for name, unet in variants.items():
        if name in low_bit:
            unet.set_qdiff_kernel("auto")
        out[name] = {"weights": weight_bytes(unet), "forward peak": forward_peak_bytes(unet, size)}
    return out


def report(results: dict, suffix: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"speed-cuda{suffix}.json", results)
    lines = ["# The exported low-bit SD-sized denoiser on a CUDA GPU", "",
             f"Command: `{results['command']}`", "", results["machine"], "",
             "Deviation from the export's reference kernel on the same GPU (max |difference| / "
             "max |reference|, 32x32 latent):", "", "| | " + " | ".join(KERNELS) + " |",
             "|---|" + "---:|" * len(KERNELS)]
    for name, by_kernel in results["deviation"].items():
        lines.append(f"| {name} | " + " | ".join(f"{by_kernel[k]:.1e}" for k in KERNELS) + " |")
    for size, case in results["forward"].items():
        names = list(case["seconds"])
        lines += ["", f"Denoiser forward, latent {size}x{size} (images {8 * int(size)}x{8 * int(size)}), "
                  f"batch 2, median of {len(case['seconds']['float32'])} repeats:", "",
                  "| | ms | float32 time / this | bfloat16 time / this |", "|---|---:|---:|---:|"]
        for name in names:
            cells = [f"{1e3 * statistics.median(case['seconds'][name]):.1f}"]
            for teacher in ("float32", "bfloat16"):
                r = case["ratios"].get(f"{name} vs {teacher}")
                cells.append(ratio_cell(r) if r else "")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"GPU memory (kernel \"auto\" for the low-bit models), latent {LATENTS[-1]}x{LATENTS[-1]}:", "",
              "| | weights MB | vs float32 | forward peak above weights MB |", "|---|---:|---:|---:|"]
    mem = results["memory"]
    for name, m in mem.items():
        lines.append(f"| {name} | {m['weights'] / 1e6:,.0f} | {m['weights'] / mem['float32']['weights']:.3f} "
                     f"| {m['forward peak'] / 1e6:,.0f} |")
    write_markdown(RESULTS / f"speed-cuda{suffix}.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of SD's width, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("eval/speed/cuda.py needs a CUDA GPU; on the CPU run python -m eval.speed.")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as the float32 teacher ships
    repeats = args.repeats or (3 if args.quick else 20)
    argv = sys.argv[1:] if argv is None else argv
    results = {"command": shlex.join(["python", "-m", "eval.speed.cuda", *argv]),
               "machine": f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"}
    with tempfile.TemporaryDirectory(prefix="qdiff-speed-cuda-") as tmp:
        variants = build(args.quick, Path(tmp))
    low_bit = {name: variants[name] for name in BITS}
    results["deviation"] = deviations(low_bit)
    results["forward"] = {}
    for size in LATENTS:
        times = timings(variants, low_bit, size, repeats)
        results["forward"][str(size)] = {"seconds": times, "ratios": ratios(times)}
    results["memory"] = memory(variants, low_bit, LATENTS[-1])
    suffix = "-quick" if args.quick else ""
    report(results, suffix)
    print((RESULTS / f"speed-cuda{suffix}.md").read_text())


if __name__ == "__main__":
    main()
