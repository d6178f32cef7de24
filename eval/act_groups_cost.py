"""What activation channel groups (quant.act_group_size) cost an exported W4A4 Linear.

    python eval/act_groups_cost.py           # -> eval/results/act-groups-cost.md and .json (~3 min)
    python eval/act_groups_cost.py --quick   # fewer tokens and repeats: checks that it runs

A grouped input exports as one integer layer per channel group, summed (`SplitIntLayer`):
the same exact sums as one layer, cut into `in / group` products of depth `group`. For the
layers of the embedded tiny Wan and of Wan 2.1 1.3B, each exported layer runs ungrouped and
with groups of 16 and 128, on the same tokens, in turns within each repeat after one
untimed warm-up, on the default kernel ("auto"). Reported: the median milliseconds of each
and their ratio to the ungrouped layer (median over repeats).
"""

from __future__ import annotations

import json
import statistics
import torch

from rotation_cost import RESULTS, TIMESTEP, exported_layer, integer_parts, milliseconds, run_shapes

SHAPES = {
    "tiny Wan q/k/v": (96, 96),
    "tiny Wan FFN in": (96, 256),
    "tiny Wan FFN out": (256, 96),
    "Wan 1.3B q/k/v": (1536, 1536),
    "Wan 1.3B FFN in": (1536, 8960),
}
GROUPS = (0, 16, 128)  # 0: one grid per token


def _context(layer: torch.nn.Module):
    """The timestep context that the layer's activation tables read (slices share one)."""
    return integer_parts(layer)[0].act.context


def measure(in_features: int, out_features: int, tokens: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, tokens, in_features)
    layers = {group: exported_layer(in_features, out_features, rotate=False, act_group_size=group)
              for group in GROUPS if group < in_features}
    times: dict[int, list[float]] = {group: [] for group in layers}
    with torch.no_grad():
        for round_ in range(repeats + 1):  # round 0 warms the fast kernels up, untimed
            for group, layer in layers.items():
                with _context(layer).use(TIMESTEP):
                    elapsed = milliseconds(lambda: layer(x))
                if round_:
                    times[group].append(elapsed)
    return {"shape": [in_features, out_features], "tokens": tokens,
            "ms": {str(group): statistics.median(t) for group, t in times.items()},
            "over_ungrouped": {str(group): statistics.median([a / b for a, b in zip(t, times[0])])
                               for group, t in times.items()}}


def write(rows: dict[str, dict], command: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "act-groups-cost.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# The cost of activation channel groups at inference", "",
             f"Command: `{command}` ({torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, kernel \"auto\")", "",
             "Exported W4A4 Linear layers (per-token dynamic 4-bit activations), one call on "
             "(1, tokens, in) float32 inputs, median ms over repeats taken in turns; `x` is the "
             "median ratio to the ungrouped layer. A grouped layer runs one integer product per "
             "group (`SplitIntLayer`), not a fused group kernel.", "",
             "| layer | in x out | tokens | ungrouped ms | groups of 16 ms | groups of 128 ms |",
             "|---|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        cells = [f"{row['ms'][g]:.2f} ({row['over_ungrouped'][g]:.1f}x)" if g in row["ms"] else "-"
                 for g in ("16", "128")]
        lines.append(f"| {name} | {row['shape'][0]} x {row['shape'][1]} | {row['tokens']} | "
                     f"{row['ms']['0']:.2f} | " + " | ".join(cells) + " |")
    (RESULTS / "act-groups-cost.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    run_shapes(__doc__.splitlines()[0], SHAPES, measure, write, "python eval/act_groups_cost.py")


if __name__ == "__main__":
    main()
