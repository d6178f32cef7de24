"""What activation channel groups (quant.act_group_size) cost an exported W4A4 Linear.

    python -m eval.speed.act_groups_cost           # -> eval/results/speed/act-groups-cost.md and .json (~3 min)
    python -m eval.speed.act_groups_cost --quick   # fewer tokens and repeats: checks that it runs

A grouped input exports as one layer whose activations enter its one matmul dequantized
(`IntLinear.grouped_forward`; format version 5). Format version 4 stored it as one integer
layer per channel group, summed (`SplitIntLayer`): exact integer sums, but `in / group`
products of depth `group`; such files still load, and the "slices" column times that
layout. For the layers of the embedded tiny Wan and of Wan 2.1 1.3B, each exported layer
runs ungrouped, with groups of 8, 16 and 128, and as slices of 16, on the same tokens, in
turns within each repeat after one untimed warm-up, on the default kernel ("auto").
Reported: the median milliseconds of each and their ratio to the ungrouped layer (median
over repeats); the slices' output is checked against the grouped layer's.
"""

from __future__ import annotations

import statistics
from contextlib import ExitStack
from dataclasses import replace

import torch
from torch import nn

from eval.speed.rotation_cost import (
    TIMESTEP,
    exported_layer,
    milliseconds,
    run_shapes,
    write_report,
)
from qdiff.export.freeze import empty_int_layer
from qdiff.export.int_layers import IntLinear
from qdiff.export.split_layer import SplitIntLayer

SHAPES = {
    "tiny Wan q/k/v": (96, 96),
    "tiny Wan FFN in": (96, 256),
    "tiny Wan FFN out": (256, 96),
    "Wan 1.3B q/k/v": (1536, 1536),
    "Wan 1.3B FFN in": (1536, 8960),
}
GROUPS = (0, 8, 16, 128)  # 0: one grid per token
SLICED = 16  # the group size also timed in format version 4's layout
COLUMNS = ("8", "16", "128", "16 sliced")


@torch.no_grad()
def sliced(layer: IntLinear) -> SplitIntLayer:
    """`layer` (grouped) as format version 4 stored it: one integer layer per channel group,
    each with a copy of the clip-ratio table."""
    width, out_features = layer.weight_shape[1], layer.weight_shape[0]
    group = layer.spec.act_group_size
    spec = replace(layer.spec, act_group_size=0, act_split=(group,) * (width // group))
    split = empty_int_layer(nn.Linear(width, out_features), spec, layer.act.context)
    split.set_weight(layer.weight_codes(), layer.weight_scale, layer.weight_zero_point)
    split.parts[0].bias.copy_(layer.bias)
    for part in split.parts:
        part.act.load_state_dict(layer.act.state_dict())
        part.set_kernel("auto")
    return split


def measure(in_features: int, out_features: int, tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, tokens, in_features)
    layers = {str(group): exported_layer(in_features, out_features, rotate=False, act_group_size=group)
              for group in GROUPS if group < in_features}
    if str(SLICED) in layers:
        layers[f"{SLICED} sliced"] = sliced(layers[str(SLICED)])
    times: dict[str, list[float]] = {name: [] for name in layers}
    contexts = [layer.act.context for layer in layers.values() if isinstance(layer, IntLinear)]
    with torch.no_grad(), ExitStack() as stack:
        for context in contexts:  # each layer has its own (the slices share their layer's)
            stack.enter_context(context.use(TIMESTEP))
        if str(SLICED) in layers:  # the two layouts compute one function
            grouped, split = layers[str(SLICED)](x), layers[f"{SLICED} sliced"](x)
            torch.testing.assert_close(split, grouped, rtol=0, atol=1e-5 * float(grouped.abs().max()))
        for round_ in range(repeats + 1):  # round 0 warms the fast kernels up, untimed
            for name, layer in layers.items():
                elapsed = milliseconds(lambda: layer(x))
                if round_:
                    times[name].append(elapsed)
    return {"shape": [in_features, out_features], "tokens": tokens,
            "ms": {name: statistics.median(t) for name, t in times.items()},
            "over_ungrouped": {name: statistics.median([a / b for a, b in zip(t, times["0"])])
                               for name, t in times.items()}}


def write(rows: dict[str, dict], command: str) -> None:
    table = ["| layer | in x out | tokens | ungrouped ms | groups of 8 ms | groups of 16 ms | "
             "groups of 128 ms | groups of 16, sliced ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        cells = [f"{row['ms'][g]:.2f} ({row['over_ungrouped'][g]:.1f}x)" if g in row["ms"] else "-"
                 for g in COLUMNS]
        table.append(f"| {name} | {row['shape'][0]} x {row['shape'][1]} | {row['tokens']} | "
                     f"{row['ms']['0']:.2f} | " + " | ".join(cells) + " |")
    write_report("act-groups-cost", "The cost of activation channel groups at inference", command,
                 "; `x` is the median ratio to the ungrouped layer. A grouped layer runs one float "
                 "matmul of dequantized activations by integer weights (`IntLinear.grouped_forward`, "
                 "format version 5); `16 sliced`: the same layer as format version 4 stored it, one "
                 "integer product per group (`SplitIntLayer`).", table, rows)


def main() -> None:
    run_shapes(__doc__.splitlines()[0], SHAPES, measure, write, "python -m eval.speed.act_groups_cost")


if __name__ == "__main__":
    main()
