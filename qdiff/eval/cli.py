"""`python -m qdiff.eval`: sample a pipeline, extract features, print and save the metrics.

    python -m qdiff.eval --metric sfid                    # latest run's export vs its teacher
    python -m qdiff.eval --pipeline assets/tiny-ldm-digits --reference real --metric fid,sfid
    python -m qdiff.eval --pipeline samples.npz --reference VIRTUAL_imagenet256_labeled.npz \
        --features inception --metric fid,sfid,is,precision,recall
    python -m qdiff.eval --pipeline runs/sd/export --prompts prompts.txt \
        --features pt_inception-2015-12-05.pth --metric fid,sfid,precision,recall

Every family samples through its declaration (`qdiff.families`): class ids balanced over
the classes, or the lines of `--prompts FILE` cycled (a run export's own prompt file by
default); each sample draws its noise from a generator of its own, so the batch size does
not change it. A video family's frames are each an image for the feature metrics (scored
per frame). Metrics that need class labels (accuracy) are skipped for a prompt family.

`--reference teacher` samples the teacher (the run's, or `--teacher PATH`) on the same
conditions: a prompt or video family with the *same* seeds (paired: a pipeline against
itself scores 0), a class-conditional image family with other seeds (for the teacher itself
that gives the metric's noise floor); `real` is the held-out digits; a `.npz` is an ADM
sample or reference batch; a folder is a pipeline.

A class-conditional video pipeline (the embedded Wan teacher, or an export of it) gets
every video metric instead (`qdiff.eval.video_eval`): per-frame class accuracy and FID,
consecutive-frame similarity, and, against the teacher sampled with the *same* seeds, the
per-frame FID to it and the error of the digit's motion.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torchvision.utils import save_image

from qdiff.cli import (InputError, add_debug_flag, check_steps, nonnegative_float,
                       nonnegative_int, pipeline_folder, positive_int, run_main, sample_size,
                       writable_output)
from qdiff.config import EvalConfig, load_config
from qdiff.eval.evaluate import (Reference, check_metrics, held_out_digits_reference,
                                  reference_from_features, score)
from qdiff.eval.feature_nets import load_feature_net
from qdiff.eval.features import extract_features
from qdiff.eval.npz import from_uint8_nhwc, load_reference_stats, load_samples
from qdiff.eval.sampling import (Samples, SamplingSettings, check_conditions,
                                  family_class_of_index, family_of, generate_samples,
                                  model_content_id, settings_for)
from qdiff.eval.video_eval import evaluate_video, is_video_pipeline
from qdiff.models.loading import load_pipeline

logger = logging.getLogger("qdiff.eval")
REFERENCE_SEED_OFFSET = 10_000  # another seed for an unpaired reference: disjoint noise
LABELLED_METRICS = ("accuracy",)  # metrics that need the samples' class labels


def latest_export(runs_dir: Path = Path("runs")) -> Path:
    exports = [index.parent for index in runs_dir.glob("*/export/model_index.json")]
    if not exports:
        raise FileNotFoundError(
            f"No run export found under {runs_dir}/. Run `python -m qdiff.finetune "
            f"configs/tiny-ldm-w4a4.yaml` first, or pass --pipeline PATH "
            f"(for example --pipeline assets/tiny-ldm-digits).")
    return max(exports, key=lambda path: (path / "model_index.json").stat().st_mtime)


def teacher_of(pipeline: Path) -> Path:
    """The teacher a run export came from (its run's config.yaml), else the pipeline itself."""
    model = run_model_config(pipeline)
    return Path(model.path) if model is not None else pipeline


def run_model_config(pipeline: Path):
    """The `model` block of the run a run export belongs to (None for another pipeline)."""
    run_config = Path(pipeline).parent / "config.yaml"
    return load_config(run_config).model if run_config.is_file() else None


def _conditions_of(pipeline: Path, prompts: Optional[str], size) -> tuple[Optional[str], Any]:
    """--prompts and --size, else the run's own model.prompts and sample size (run exports)."""
    model = run_model_config(pipeline) if pipeline.suffix != ".npz" else None
    if model is not None:
        prompts = prompts or model.prompts
        size = size or model.video_size or model.image_size
    return prompts, size


def _samples_of(source: Path, settings: SamplingSettings, out_dir: Path,
                prompts: Optional[str] = None, size=None) -> Samples:
    """uint8 NHWC images (a video's frames each one) and their condition ids: read from an
    ADM .npz, or sampled from a pipeline through its family (`prompts`: the prompt file of
    a prompt family; `size`: the sample size, None for the pipeline's own)."""
    if source.suffix == ".npz":
        images, labels = load_samples(source)
        return Samples(images, labels)
    pipe = load_pipeline(source)  # checks an export's files against its manifest
    family = family_of(pipe, prompts, size, str(source))
    settings = settings_for(family, settings)
    content = model_content_id(Path(pipe.name_or_path))  # a hub id's local snapshot
    return generate_samples(family, settings, out_dir / f"samples-{settings.cache_key(content)}.npz")


def build_reference(kind: str, pipeline: Path, settings: SamplingSettings, net,
                    shipped_stats, out_dir: Path, prompts: Optional[str] = None, size=None,
                    teacher: Optional[Path] = None, paired: bool = False) -> Reference:
    """What the samples are compared with. `paired`: the teacher (or a pipeline given as the
    reference) samples the same seeds as the evaluated pipeline, not other ones."""
    if kind == "real":
        if shipped_stats is None:
            raise InputError("--reference real is the held-out digits (with --features digits); "
                             "for other data pass an ADM reference batch: --reference PATH.npz")
        return held_out_digits_reference(net, shipped_stats)
    source = (teacher or teacher_of(pipeline)) if kind == "teacher" else Path(kind)
    if source.suffix == ".npz" and load_reference_stats(source) is not None:
        images, _ = load_samples(source)
        features = extract_features(net, from_uint8_nhwc(images), progress=True)
        return Reference(str(source), load_reference_stats(source), features.pool)
    seeds = settings if paired else replace(settings, seed=settings.seed + REFERENCE_SEED_OFFSET)
    images = _samples_of(source, seeds, out_dir, prompts, size).images
    features = extract_features(net, from_uint8_nhwc(images), progress=True)
    what = "same seeds" if paired else f"seed {seeds.seed}"
    return reference_from_features(f"{source} ({what})", features)


def _default_out(pipeline: Path) -> Path:
    if (pipeline.parent / "config.yaml").is_file():
        return pipeline.parent / "eval" / "results.json"
    return Path("runs") / "eval" / pipeline.stem / "results.json"


def _write_outputs(out: Path, record: dict, images: np.ndarray, labels, frames: int = 1) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"| metric | {Path(record['pipeline']).name} vs {record['reference']} |", "|---|---:|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in record["results"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if frames > 1:  # the first 10 videos, one a row, frames left to right
        save_image(from_uint8_nhwc(images[:10 * frames]), out.with_name("samples.png"),
                   nrow=frames, padding=1)
    else:
        first = from_uint8_nhwc(images[:100])
        if labels is not None:
            first = first[torch.argsort(torch.as_tensor(labels[:100]), stable=True)]
        save_image(first, out.with_name("samples.png"), nrow=10, padding=1)
    print("\n".join(lines))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_name('samples.png')}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = EvalConfig()
    parser = argparse.ArgumentParser(prog="python -m qdiff.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--metric", action="append", default=None,
                        help="fid, sfid, is, precision, recall, accuracy (repeat or comma list)")
    parser.add_argument("--pipeline", type=Path, default=None,
                        help="pipeline folder or ADM samples .npz (default: latest run export)")
    parser.add_argument("--reference", default="teacher",
                        help="teacher (the run's, or --teacher) | real (held-out digits) | "
                             "PATH (a pipeline folder or an ADM .npz)")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="the teacher pipeline of --reference teacher (default: the run's "
                             "model.path, for a run export; else the pipeline itself)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="prompt families: a text file, one prompt per line, cycled over "
                             "the samples (default: a run export's model.prompts); class "
                             "families sample balanced class ids instead")
    parser.add_argument("--size", type=sample_size, default=None, metavar="[F,]H,W",
                        help="sample size: HEIGHT,WIDTH, or FRAMES,HEIGHT,WIDTH for a video "
                             "family (default: a run export's model size, else the pipeline's)")
    parser.add_argument("--num-samples", type=positive_int, default=defaults.num_samples)
    parser.add_argument("--steps", type=positive_int, default=defaults.steps)
    parser.add_argument("--guidance", type=nonnegative_float, default=defaults.guidance_scale)
    parser.add_argument("--seed", type=nonnegative_int, default=defaults.seed)
    parser.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    parser.add_argument("--features", default=defaults.features, help="digits | inception | PATH: FID Inception-v3 weights (.pth or "
                             ".safetensors), or a folder of a saved feature network")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    try:
        check_metrics(",".join(args.metric or defaults.metrics).split(","))
    except ValueError as error:
        parser.error(f"argument --metric: {error}")
    return args


def check_source(source: Path, option: str, steps: int) -> None:
    """An ADM .npz must be a file; anything else must be a pipeline folder (or a hub id)."""
    if source.suffix == ".npz":
        if not source.is_file():
            raise InputError(f"{option} {source}: no such file; give an ADM .npz batch or a "
                             f"pipeline folder.")
        load_reference_stats(source)  # opens the archive: a damaged file fails here, early
        return
    pipeline_folder(source, option)
    check_steps(source, steps)


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse a source, a reference, conditions or an output that cannot work, before any
    sampling."""
    check_source(args.pipeline, "--pipeline", args.steps)
    prompts, _ = _conditions_of(args.pipeline, args.prompts, args.size)
    sources = [(args.pipeline, "--pipeline")]
    if args.reference not in ("teacher", "real"):
        check_source(Path(args.reference), "--reference", args.steps)
        sources.append((Path(args.reference), "--reference"))
    elif args.reference == "teacher" and args.teacher is not None:
        check_source(args.teacher, "--teacher", args.steps)
    for source, option in sources:
        if source.suffix != ".npz" and (source / "model_index.json").is_file():
            index = pipeline_folder(source, option)
            check_conditions(family_class_of_index(index), str(source), prompts, option)
    writable_output(args.out or _default_out(args.pipeline))


def run(args: argparse.Namespace) -> dict:
    pipeline = args.pipeline or latest_export()
    out = args.out or _default_out(pipeline)
    settings = SamplingSettings(args.num_samples, args.steps, args.guidance, args.seed,
                                args.batch_size)
    teacher = getattr(args, "teacher", None)
    if is_video_pipeline(pipeline):  # every video metric, in the digits network's space
        return evaluate_video(pipeline, teacher or teacher_of(pipeline), args.reference,
                              settings, out)
    prompts, size = _conditions_of(pipeline, getattr(args, "prompts", None),
                                   getattr(args, "size", None))
    metrics = check_metrics(",".join(args.metric or EvalConfig().metrics).split(","))
    net, shipped_stats = load_feature_net(args.features)
    start = time.time()
    samples = _samples_of(pipeline, settings, out.parent, prompts, size)
    if samples.conditions != "classes" or samples.labels is None:
        for name in [name for name in metrics if name in LABELLED_METRICS]:
            logger.info("skipping %s: it needs class labels, and %s", name,
                        "the samples are unlabelled" if samples.labels is None
                        else "the pipeline is conditioned on prompts")
            metrics.remove(name)
    features = extract_features(net, from_uint8_nhwc(samples.images), progress=True)
    paired = samples.conditions == "prompts" or samples.frames > 1
    reference = build_reference(args.reference, pipeline, settings, net, shipped_stats, out.parent,
                                prompts, size, teacher, paired)
    label_tensor = (torch.as_tensor(samples.labels)
                    if samples.labels is not None and samples.conditions == "classes" else None)
    results = score(features, label_tensor, reference, metrics,
                    class_logits=args.features != "inception" and shipped_stats is not None)
    record = {"pipeline": str(pipeline), "reference": reference.name, "features": args.features,
              "settings": asdict(settings), "conditions": prompts or samples.conditions,
              "num_evaluated": len(samples.images) // samples.frames,
              "frames_per_sample": samples.frames,
              "scored": "per frame" if samples.frames > 1 else "per image",
              "seconds": round(time.time() - start, 1), "results": results}
    _write_outputs(out, record, samples.images, samples.labels, samples.frames)
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    run_main(lambda: _checked_run(args), args)


def _checked_run(args: argparse.Namespace) -> dict:
    args.pipeline = args.pipeline or latest_export()
    check_inputs(args)
    return run(args)
