"""Quality of the embedded teacher, in the digits feature network's space.

    python -m eval.quality.teacher                       # 1000 samples, 20 DDIM steps, guidance 1..5

For each guidance scale: class accuracy (the feature network agrees with the requested
class), FID and sFID against the real held-out digits. Two real-data rows give the scale:
the train split against the held-out split (what a perfect model of the train split
would score) and one half of the held-out split against the other. Writes
eval/results/quality/teacher.md, teacher.json and teacher-samples.png.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

import torch
from torchvision.utils import save_image

import qdiff
from eval.common.report import results_dir, write_json, write_markdown
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
from qdiff.models.zoo.digits_data import load_digits_split

RESULTS = results_dir("quality")
METRICS = ("accuracy", "fid", "sfid", "precision", "recall")


def real_rows(net, reference: Reference) -> list[dict]:
    """Real digits scored like samples: the scale against which the teacher is read."""
    train, held_out = load_digits_split("train"), load_digits_split("held_out")
    rows = [{"source": f"real: train split ({len(train.labels)})",
             **score(extract_features(net, (train.images + 1) / 2), train.labels, reference,
                     METRICS, class_logits=True)}]
    half = len(held_out.labels) // 2
    other_half = reference_from_features(
        "second half", extract_features(net, (held_out.images[half:] + 1) / 2))
    rows.append({"source": f"real: held-out half vs other half ({half})",
                 **score(extract_features(net, (held_out.images[:half] + 1) / 2),
                         held_out.labels[:half], other_half, METRICS, class_logits=True)})
    return rows


def write_report(rows: list[dict], settings: dict, command: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "teacher.json", {"settings": settings, "rows": rows})
    lines = ["# Embedded teacher quality (assets/tiny-ldm-digits)", "",
             f"Command: `{command}`", "",
             f"{settings['num_samples']} samples (classes balanced), {settings['steps']} DDIM "
             f"steps, eta 0, seed {settings['seed']}. Features, FID, sFID and precision/recall "
             f"(k=3) of the digits feature network (assets/digits-features) against the real "
             f"held-out digits (450 images). Machine: {settings['machine']}, "
             f"torch {settings['torch']}.", "",
             "| source | guidance | class accuracy | FID | sFID | precision | recall | sampling s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['source']} | {row.get('guidance', '')} | {row['accuracy']:.2%} | "
                     f"{row['fid']:.3f} | {row['sfid']:.3f} | {row['precision']:.3f} | "
                     f"{row['recall']:.3f} | {row.get('seconds', '')} |")
    lines += ["", f"Samples at guidance {settings['grid_guidance']}: `teacher-samples.png` "
              f"(one row per class).", ""]
    write_markdown(RESULTS / "teacher.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="assets/tiny-ldm-digits")
    parser.add_argument("--features", default="digits")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", default="1,2,3,4,5", help="comma-separated scales")
    parser.add_argument("--grid-guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = qdiff.load_pipeline(args.pipeline)
    net, stats = load_feature_net(args.features)
    reference = held_out_digits_reference(net, stats)
    rows = real_rows(net, reference)
    for guidance in (float(g) for g in args.guidance.split(",")):
        settings = SamplingSettings(args.num_samples, args.steps, guidance, args.seed, 250)
        start = time.time()
        images, labels = generate(pipe, settings)
        seconds = round(time.time() - start, 1)
        images = from_uint8_nhwc(images)
        rows.append({"source": "teacher", "guidance": guidance, "seconds": seconds,
                     **score(extract_features(net, images), torch.as_tensor(labels),
                             reference, METRICS, class_logits=True)})
        print(rows[-1], flush=True)
        if guidance == args.grid_guidance:
            order = torch.argsort(torch.as_tensor(labels[:200]), stable=True)
            save_image(images[:200][order], RESULTS / "teacher-samples.png", nrow=20, padding=1)
    settings_record = {"num_samples": args.num_samples, "steps": args.steps, "seed": args.seed,
                       "grid_guidance": args.grid_guidance,
                       "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                       "torch": torch.__version__}
    write_report(rows, settings_record, shlex.join(["python", "-m", "eval.quality.teacher", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
