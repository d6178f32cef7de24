"""What the Hadamard input rotation (quant.rotate_inputs) costs an exported W4A4 Linear.

    python -m eval.speed.rotation_cost           # -> eval/results/speed/rotation-cost.md and .json (~3 min)
    python -m eval.speed.rotation_cost --quick   # fewer tokens and repeats: checks that it runs

A rotated layer runs `x @ H` (one small matmul per Kronecker factor of H,
qdiff.quant.rotation) before its integer kernel; everything else is the same layer. For the
shapes that the video recipes would rotate (the self-attention q/k/v and the FFN's first
Linear of the embedded tiny Wan, Wan 2.1 1.3B and Wan 2.1 14B; CogVideoX-2B's width 1920 and
5B's 3072), each exported layer runs with and without the rotation on the same tokens, in
turns within each repeat after one untimed warm-up, on the default kernel ("auto").
Reported: the median milliseconds of each, their ratio (min / median / max over repeats),
and the rotation alone. The float32 nn.Linear of the same shape is the yardstick.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from eval.common.report import results_dir, write_json, write_markdown
from qdiff.config import QuantConfig
from qdiff.export.freeze import freeze_layer
from qdiff.quant.layers import QuantLinear
from qdiff.quant.timestep_context import TimestepContext

RESULTS = results_dir("speed")
# name -> (in_features, out_features): the layers a video recipe would rotate
SHAPES = {
    "tiny Wan q/k/v": (96, 96),
    "tiny Wan FFN in": (96, 256),
    "Wan 1.3B q/k/v": (1536, 1536),
    "Wan 1.3B FFN in": (1536, 8960),
    "CogVideoX-2B q/k/v": (1920, 1920),
    "CogVideoX-5B q/k/v": (3072, 3072),
    "Wan 14B q/k/v": (5120, 5120),
}
TIMESTEP = torch.tensor([500.0])


def exported_layer(in_features: int, out_features: int, rotate: bool, act_group_size: int = 0) -> nn.Module:
    """The W4A4 (per-token dynamic activations) integer layer that an export would hold."""
    cfg = QuantConfig(weight_bits=4, act_bits=4, act_mode="dynamic_per_token", act_group_size=act_group_size)
    context = TimestepContext()
    linear = nn.Linear(in_features, out_features)
    student = QuantLinear.from_module(linear, 4, 4, cfg, None, None, context, rotate_input=rotate)
    layer = freeze_layer("layer", student, context)
    layer.set_kernel("auto")
    return layer


def milliseconds(run: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    run()
    return 1e3 * (time.perf_counter() - start)


def measure(in_features: int, out_features: int, tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, tokens, in_features)
    float_layer = nn.Linear(in_features, out_features)
    plain = exported_layer(in_features, out_features, rotate=False)
    rotated = exported_layer(in_features, out_features, rotate=True)
    variants = {"float32": lambda: float_layer(x), "W4A4": lambda: plain(x),
                "W4A4 rotated": lambda: rotated(x), "rotation": lambda: rotated.input_rotation(x)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad(), plain.act.context.use(TIMESTEP), rotated.act.context.use(TIMESTEP):
        for run in variants.values():  # warm-up: the fast kernels prepare their weights once
            run()
        for _ in range(repeats):
            for name, run in variants.items():
                times[name].append(milliseconds(run))
    ratios = [r / p for r, p in zip(times["W4A4 rotated"], times["W4A4"])]
    return {"shape": [in_features, out_features], "tokens": tokens,
            "ms": {name: statistics.median(t) for name, t in times.items()},
            "rotated_over_plain": [min(ratios), statistics.median(ratios), max(ratios)]}


def write_report(stem: str, title: str, command: str, description: str, table: list[str],
                 rows: dict[str, dict]) -> None:
    """RESULTS/stem.json (the rows) and stem.md: title, command with threads and torch
    version, what was timed (`description`, after the common part), then `table`."""
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{stem}.json", {"rows": rows})
    lines = [f"# {title}", "",
             f"Command: `{command}` ({torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, kernel \"auto\")", "",
             "Exported W4A4 Linear layers (per-token dynamic 4-bit activations), one call on "
             "(1, tokens, in) float32 inputs, median ms over repeats taken in turns" + description,
             "", *table]
    write_markdown(RESULTS / f"{stem}.md", "\n".join(lines) + "\n")


def write(rows: dict[str, dict], command: str) -> None:
    table = ["| layer | in x out | tokens | float32 ms | W4A4 ms | W4A4 rotated ms | "
             "rotation alone ms | rotated / plain |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, row in rows.items():
        ms, (low, mid, high) = row["ms"], row["rotated_over_plain"]
        table.append(f"| {name} | {row['shape'][0]} x {row['shape'][1]} | {row['tokens']} | "
                     f"{ms['float32']:.2f} | {ms['W4A4']:.2f} | {ms['W4A4 rotated']:.2f} | "
                     f"{ms['rotation']:.2f} | {low:.2f} / **{mid:.2f}** / {high:.2f} |")
    write_report("rotation-cost", "The cost of a Hadamard input rotation at inference", command,
                 ". `rotated / plain`: min / median / max over repeats.", table, rows)


def run_shapes(description: str, shapes: dict[str, tuple[int, int]],
               measure: Callable[[int, int, int, int], dict],
               write: Callable[[dict[str, dict], str], None], command: str) -> None:
    """The command line of a layer-cost script: every shape measured, then written."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="256 tokens, 3 repeats")
    args = parser.parse_args()
    tokens, repeats = (256, 3) if args.quick else (1024, 15)
    rows = {}
    for name, (in_features, out_features) in shapes.items():
        rows[name] = measure(in_features, out_features, tokens, repeats)
        print(name, rows[name]["ms"], flush=True)
    if args.quick:
        print("--quick: results not written")
        return
    write(rows, command)


def main() -> None:
    run_shapes(__doc__.splitlines()[0], SHAPES, measure, write, "python -m eval.speed.rotation_cost")


if __name__ == "__main__":
    main()
