"""The noise floor of every metric: the embedded teacher against itself with other seeds.

    python -m eval.quality.noise            # 3 pairs of 1000-sample sets, the eval defaults

A difference between two models smaller than these numbers cannot be told from the
luck of the seeds. For each pair of disjoint seed sets: FID, sFID, IS, precision and
recall of one set against the other, and the change in class accuracy; and for every
set, FID/sFID against the real held-out digits (their spread is the noise of
"vs real" comparisons). Writes eval/results/quality/eval-noise.md and eval-noise.json.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch

import qdiff
from eval.common.report import results_dir, write_json, write_markdown
from qdiff.config import EvalConfig
from qdiff.eval.evaluate import (
    Reference,
    held_out_digits_reference,
    reference_from_features,
    score,
)
from qdiff.eval.feature_nets import load_feature_net
from qdiff.eval.features import extract_features
from qdiff.eval.npz import from_uint8_nhwc
from qdiff.eval.sampling import SamplingSettings, generate

RESULTS = results_dir("quality")
SEED_STRIDE = 10_000  # batch b of a set uses seed + b: sets this far apart share no seed


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)),
            "max": float(np.max(np.abs(values)))}


def measure(pipe, net, real: Reference, settings: SamplingSettings, pairs: int) -> dict:
    sets = []
    for index in range(2 * pairs):
        images, labels = generate(pipe, SamplingSettings(
            settings.num_samples, settings.steps, settings.guidance,
            settings.seed + index * SEED_STRIDE, settings.batch_size))
        features = extract_features(net, from_uint8_nhwc(images))
        sets.append((features, torch.as_tensor(labels)))
    pair_rows = []
    for first, second in zip(sets[0::2], sets[1::2]):
        reference = reference_from_features("other seeds", second[0])
        row = score(first[0], first[1], reference, ("fid", "sfid", "precision", "recall"), True)
        row["is_change"] = (score(first[0], None, real, ["is"], False)["is"]
                            - score(second[0], None, real, ["is"], False)["is"])
        row["accuracy_change"] = (score(first[0], first[1], real, ["accuracy"], True)["accuracy"]
                                  - score(second[0], second[1], real, ["accuracy"], True)["accuracy"])
        pair_rows.append(row)
    real_rows = [score(features, labels, real, ["fid", "sfid", "accuracy"], True)
                 for features, labels in sets]
    return {"pairs": pair_rows, "vs_real": real_rows}


def write_report(result: dict, settings: SamplingSettings, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "eval-noise.json", {"settings": vars(settings), **result})
    names = ["fid", "sfid", "precision", "recall", "is_change", "accuracy_change"]
    lines = ["# Noise floor of the metrics (embedded teacher vs itself, other seeds)", "",
             f"Command: `{command}`", "",
             f"Each set: {settings.num_samples} samples, {settings.steps} DDIM steps, guidance "
             f"{settings.guidance}, digits feature network. {len(result['pairs'])} pairs of "
             f"sets with disjoint seeds.", "",
             "## One set against another (what 'no difference' looks like)", "",
             "| metric | " + " | ".join(f"pair {i + 1}" for i in range(len(result['pairs'])))
             + " | mean | max abs |", "|---|" + "---:|" * (len(result["pairs"]) + 2)]
    for name in names:
        values = [row[name] for row in result["pairs"]]
        stats = _summary(values)
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values)
                     + f" | {stats['mean']:.4f} | {stats['max']:.4f} |")
    lines += ["", "## Each set against the real held-out digits (spread = noise of 'vs real')",
              "", "| metric | mean | std | min | max |", "|---|---:|---:|---:|---:|"]
    for name in ("fid", "sfid", "accuracy"):
        values = [row[name] for row in result["vs_real"]]
        lines.append(f"| {name} | {np.mean(values):.4f} | {np.std(values):.4f} | "
                     f"{np.min(values):.4f} | {np.max(values):.4f} |")
    write_markdown(RESULTS / "eval-noise.md", "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="assets/tiny-ldm-digits")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=defaults.num_samples)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--guidance", type=float, default=defaults.guidance_scale)
    args = parser.parse_args(argv)
    settings = SamplingSettings(args.num_samples, args.steps, args.guidance, 0, 250)
    net, stats = load_feature_net("digits")
    real = held_out_digits_reference(net, stats)
    result = measure(qdiff.load_pipeline(args.pipeline), net, real, settings, args.pairs)
    write_report(result, settings, shlex.join(["python", "-m", "eval.quality.noise", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
