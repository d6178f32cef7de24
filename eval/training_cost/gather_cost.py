"""What one clipped weight costs the low-rank LoRA backward, against the dense weight gradient.

    python -m eval.training_cost.gather_cost          # ~3 min on 2 cores
    python -m eval.training_cost.gather_cost --quick  # a quarter of the tokens and widths (smoke run)

`lora.low_rank_backward` corrects B's and A's gradients at the clipped weights with one
dot product over tokens per clipped entry (`GradOps.weight_grad_at`): gathered,
memory-bound work. The dense alternative is the full weight gradient (`weight_grad`), one
matrix product or convolution weight gradient. `lora_backward.GATHER_COST`, the cost of a
gathered multiply-add over that of a dense one, decides per call which way `lora_grads`
goes. This times both, interleaved, median of `--repeats`, on SD-1.5 layer shapes at two
clipped shares; the slope between the two shares is the cost per entry (what is left at
zero entries -- the transposed copies a Linear's gathers read from -- is reported apart).
Writes eval/results/training_cost/gather-cost.md and .json.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
from torch import nn

from eval.common.report import results_dir, write_json, write_markdown
from qdiff.quant.lora_backward import GATHER_COST, Conv2dGradOps, GradOps, LinearGradOps

RESULTS = results_dir("training_cost")
# (label, kind, in channels, out channels, input size): batch 2 (guidance), SD's 64x64 latents
SHAPES = [("attention q/k/v, 32x32 tokens, 640 wide", "linear", 640, 640, (2, 1024)),
          ("FFN in, 32x32 tokens, 640 -> 5120", "linear", 640, 5120, (2, 1024)),
          ("resnet 3x3 conv, 64x64, 320 channels", "conv", 320, 320, (2, 64, 64)),
          ("resnet 3x3 conv, 16x16, 1280 channels", "conv", 1280, 1280, (2, 16, 16))]
SHARES = (0.002, 0.02)


def operands(kind: str, cin: int, cout: int, size: tuple, gen: torch.Generator):
    """(ops, x, grad, weight shape) of a layer of `kind`."""
    if kind == "linear":
        x = torch.randn(*size, cin, generator=gen)
        return LinearGradOps(), x, torch.randn(*size, cout, generator=gen), (cout, cin)
    ops = Conv2dGradOps(nn.Conv2d(cin, cout, 3, padding=1))
    x = torch.randn(size[0], cin, *size[1:], generator=gen)
    return ops, x, torch.randn(size[0], cout, *size[1:], generator=gen), (cout, cin, 3, 3)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(ops: GradOps, x: torch.Tensor, grad: torch.Tensor, shape: tuple, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(1)
    rows_cols = {share: (torch.rand(shape, generator=gen) < share).flatten(1).nonzero(as_tuple=True)
                 for share in SHARES}
    times: dict[str, list[float]] = {"dense": [], **{str(share): [] for share in SHARES}}
    for _ in range(repeats):  # interleaved, so that a slow minute hits every variant
        times["dense"].append(median_seconds(lambda: ops.weight_grad(x, grad), 1))
        for share, (rows, cols) in rows_cols.items():
            times[str(share)].append(median_seconds(lambda: ops.weight_grad_at(x, grad, rows, cols), 1))
    dense = statistics.median(times["dense"])
    (low, (rows_low, _)), (high, (rows_high, _)) = rows_cols.items()
    gather_low, gather_high = statistics.median(times[str(low)]), statistics.median(times[str(high)])
    tokens = grad[:, 0].numel() if isinstance(ops, Conv2dGradOps) else grad[..., 0].numel()
    macs = tokens * torch.Size(shape).numel()
    per_entry = (gather_high - gather_low) / ((rows_high.numel() - rows_low.numel()) * tokens)
    fixed = gather_low - per_entry * rows_low.numel() * tokens
    return {"tokens": tokens, "weight": list(shape), "dense_ms": 1e3 * dense,
            "gather_ms": {str(low): 1e3 * gather_low, str(high): 1e3 * gather_high},
            "clipped": {str(low): rows_low.numel(), str(high): rows_high.numel()},
            "fixed_ms": 1e3 * fixed, "cost_ratio": per_entry / (dense / macs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a quarter of the tokens and widths")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    divide = 4 if args.quick else 1
    gen = torch.Generator().manual_seed(0)
    rows = []
    for label, kind, cin, cout, size in SHAPES:
        size = (size[0], *[s // divide for s in size[1:]]) if kind == "conv" else (size[0], size[1] // divide)
        ops, x, grad, shape = operands(kind, cin // divide, cout // divide, size, gen)
        rows.append({"layer": label, **measure(ops, x, grad, shape, args.repeats)})
        print(rows[-1], flush=True)
    command = shlex.join(["python", "-m", "eval.training_cost.gather_cost", *(argv if argv is not None else sys.argv[1:])])
    low, high = (str(share) for share in SHARES)
    ratios = [row["cost_ratio"] for row in rows]
    lines = ["# Cost of the low-rank backward's correction per clipped weight", "",
             f"Command: `{command}`", "",
             f"{torch.get_num_threads()} thread(s), torch {torch.__version__}; float32, medians of "
             f"{args.repeats} interleaved repeats. `dense`: the full weight gradient "
             "(`GradOps.weight_grad`); `gather`: the weight gradient at the clipped entries only "
             f"(`weight_grad_at`), with {100 * float(low):g}% and {100 * float(high):g}% of the "
             "weights clipped at random. `cost ratio`: the gather's seconds per multiply-add "
             "(the slope between the two shares) over the dense product's; `fixed`: the "
             "gather's time extrapolated to no entry (a Linear transposes x and g, a conv pads "
             "x; `low_rank_is_cheaper` leaves it out).", "",
             f"| layer | tokens | weight | dense ms | gather ms at {100 * float(low):g}% | "
             f"gather ms at {100 * float(high):g}% | fixed ms | cost ratio |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['layer']} | {row['tokens']} | {' x '.join(map(str, row['weight']))} | "
                     f"{row['dense_ms']:.1f} | {row['gather_ms'][low]:.1f} | "
                     f"{row['gather_ms'][high]:.1f} | {row['fixed_ms']:.1f} | {row['cost_ratio']:.0f} |")
    lines += ["", f"Cost ratio median {statistics.median(ratios):.0f}, range {min(ratios):.0f}-"
              f"{max(ratios):.0f}; `qdiff.quant.lora_backward.GATHER_COST` is {GATHER_COST:g}."]
    RESULTS.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    write_json(RESULTS / f"gather-cost{suffix}.json", {"command": command, "rows": rows})
    text = "\n".join(lines) + "\n"
    write_markdown(RESULTS / f"gather-cost{suffix}.md", text)
    print(text)


if __name__ == "__main__":
    main()
