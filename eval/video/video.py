"""QVGen on the embedded video teacher: W4A4 with and without Phi, calibrated PTQ, W3A3.

    python -m eval.video            # -> eval/results/video/video.md, .json, video-training.png, video-frames.png
    python -m eval.video --quick    # smoke run: few videos and steps -> video-quick.*
    python -m eval.video --rows "W4A4 calibrated PTQ,W4A4 qdiff" --report video-lr3e-4 \
        distill.lr=3e-4    # a variant of every trained row -> video-lr3e-4.*
        (distill.target is gone: every run now matches each denoiser call's raw output, the
        conditional and null branches as the pipeline batches them -- what
        distill.target=branches did -- so the video-branches* reports are the default objective)
    python -m eval.video --rows "W4A4 qdiff" --label "full QAT" --ptq-from video-act-groups-8 \
        --report video-qat quant.act_group_size=8 lora.enabled=false distill.base_weight_lr=1e-5
        # rows named "W4A4 qdiff (full QAT)", gap closed against that report's PTQ row

The teacher is assets/tiny-wan-digits (a class-conditional Wan transformer on moving
digits, `python -m qdiff.models.zoo.video_digits`). Rows, each from configs/tiny-wan-<bits>.yaml:
- calibrated PTQ: the recipe's quantizers after calibration, no training;
- qdiff: QALoRA + per-token activations with learned clipping, no auxiliary modules;
- qdiff + Phi: the recipe itself, QVGen's Phi decayed to rank 0 during the run
  (same steps, trajectories and seeds as qdiff).
Every row's *exported* pipeline (Phi gone, integer weights) samples the same seeds as the
FP teacher, and is scored frame by frame in the digits feature network's space:
class accuracy, per-frame FID against real held-out moving-digit frames, against the FP
frames of the same seeds and against FP frames of other seeds (distributions alone), and
over time the feature similarity of consecutive frames and the error of the digit's motion
(centre of mass) against the FP video of the same seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torchvision.utils import save_image

import qdiff
from eval.common.plotting import require_matplotlib
from eval.common.report import results_dir, write_json, write_markdown
from eval.video.gaps import gap_closed, same_fp_videos
from qdiff.config import load_config
from qdiff.distill.checkpoint import latest_checkpoint
from qdiff.distill.loop import build_student, distill, student_at
from qdiff.eval.feature_nets import load_feature_net
from qdiff.eval.sampling import SamplingSettings, balanced_labels
from qdiff.eval.video_eval import real_frames_pool, sample_videos
from qdiff.eval.video_metrics import frame_features, frame_fid, video_metrics
from qdiff.export import export_pipeline
from qdiff.families import frames_side_by_side

RESULTS = results_dir("video")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# row name -> (recipe bits, trained?, overrides of the recipe)
ROWS: dict[str, tuple[str, bool, list[str]]] = {
    "W4A4 calibrated PTQ": ("w4a4", False, ["aux.enabled=false"]),
    "W4A4 qdiff": ("w4a4", True, ["aux.enabled=false"]),
    "W4A4 qdiff + Phi": ("w4a4", True, []),
    "W3A3 calibrated PTQ": ("w3a3", False, ["aux.enabled=false"]),
    "W3A3 qdiff": ("w3a3", True, ["aux.enabled=false"]),
    "W3A3 qdiff + Phi": ("w3a3", True, []),
}
QUICK = ["distill.steps=40", "quant.calibration_samples=2", "distill.checkpoint_every=20",
         "aux.phase_steps=4"]
STRIP_CLASSES = (0, 3, 7)


def run_row(pipe, name: str, workdir: Path, extra: list[str]) -> list[tuple[str, object, dict]]:
    """The exported pipelines of one row, each with where its training log is: the run's
    student and, where the run keeps an average (`distill.ema_decay`), its last step's
    weights too (the same training, so their difference is the average's alone)."""
    bits, trained, overrides = ROWS[name]
    run = "video-" + name.lower().replace(" ", "-").replace("+", "plus")
    settings = ["output_dir=runs", f"name={run}", "export.enabled=false",
                "distill.sample_every=100000", "distill.log_every=1", *overrides, *extra]
    cfg = load_config(CONFIGS / f"tiny-wan-{bits}.yaml", settings)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run, not a resumed one
    students = {name: distill(pipe, cfg, cfg.run_dir) if trained else build_student(pipe, cfg).model}
    if trained and cfg.distill.ema_decay > 0:
        students[f"{name}, last step's weights"] = student_at(
            pipe, cfg, latest_checkpoint(cfg.run_dir), averaged=False)
    fields = {"log": str(cfg.run_dir / "log.jsonl") if trained else None}
    exported = []
    for label, student in students.items():
        folder = export_pipeline(pipe, student, workdir / f"{run}-{len(exported)}", cfg.quant)
        loaded = qdiff.load_pipeline(folder)  # the export above refuses a Phi left over
        if any("aux" in key or "lora" in key for key in loaded.transformer.state_dict()):
            raise RuntimeError(f"the export of {label} carries Phi or LoRA tensors")
        exported.append((label, loaded, fields))
    return exported


def weights_digest(folder: Path) -> str:
    """SHA-256 of every safetensors file under `folder` (a pipeline's weights)."""
    digest = hashlib.sha256()
    for weights in sorted(folder.rglob("*.safetensors")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()


def teacher_videos(pipe, labels: torch.Tensor, settings: SamplingSettings, teacher_digest: str,
                   cache: Path) -> torch.Tensor:
    """The teacher's videos for `settings`, sampled once per teacher weights and settings
    and kept in `cache`: every variant scores against the same FP videos, whose two rows
    cost about ten minutes of a run."""
    key = json.dumps({"teacher": teacher_digest, **dataclasses.asdict(settings)}, sort_keys=True)
    path = cache / f"fp-videos-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        return load_file(path)["videos"]
    videos = sample_videos(pipe, labels, settings)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")  # a crash mid-write never leaves a cache that loads
    save_file({"videos": videos.contiguous()}, partial)
    partial.replace(path)
    return videos


def borrowed_ptq_rows(report: str, fp: dict, num_videos: int) -> list[dict]:
    """The calibrated PTQ rows of an earlier report, to measure the gap this run's rows close
    without sampling PTQ again; only when that report scored the same FP videos (to float
    rounding: gaps.FP_MATCH_TOLERANCE)."""
    path = RESULTS / f"{report}.json"
    if not path.is_file():
        raise SystemExit(f"--ptq-from {report}: {path} does not exist; name a report in {RESULTS}")
    earlier = json.loads(path.read_text())
    earlier_fp = earlier["rows"][0]
    if earlier["num_videos"] != num_videos or not same_fp_videos(earlier_fp, fp):
        raise SystemExit(f"--ptq-from {report}: its FP videos differ from this run's ({earlier['num_videos']} "
                         f"videos, FID {earlier_fp['frame_fid_real']:.6f} against {num_videos}, "
                         f"{fp['frame_fid_real']:.6f}); its gaps are not this run's. Run the PTQ row "
                         "here (--rows) or name a report of the same teacher and settings")
    ptq = [r for r in earlier["rows"] if " calibrated PTQ" in r["name"]]
    if not ptq:
        raise SystemExit(f"--ptq-from {report}: it has no calibrated PTQ row")
    return [{**r, "name": f"{r['name']} (from {report})"} for r in ptq]


def reference_ptq(row: dict, rows: list[dict]) -> dict | None:
    """The calibrated PTQ row of `row`'s bits (this run's, or the one --ptq-from borrowed)."""
    return next((r for r in rows if r["name"].startswith(row["name"][:4] + " calibrated PTQ")), None)


def write_table(rows: list[dict], cfg, num_videos: int, command: str, report: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / f"{report}.json", {"command": command, "num_videos": num_videos, "rows": rows})
    fp = rows[0]
    lines = ["# QVGen on the embedded video teacher", "", f"Command: `{command}`", "",
             f"{num_videos} videos per row ({num_videos * rows[0]['frames']} frames), "
             f"{cfg.eval.steps} Euler steps, guidance {cfg.eval.guidance_scale}, the FP row's "
             "seeds for every row; quantized rows sample their exported pipeline. Digits "
             "feature network on every frame. `FID` against real held-out moving-digit "
             "frames, `FID to FP` against the FP frames; `similarity`: cosine of consecutive "
             "frames' features; `motion err`: pixels per frame between the digit's motion and "
             "the FP video's of the same seed. `FP, other seeds`: the teacher on other "
             "seeds, the noise floor of `FID to FP` (its motion error compares different "
             "videos and means nothing). `FID to FP's other seeds`: against that row's "
             "frames, a distance between distributions alone, where `FID to FP` also counts "
             "how far each video strays from the FP video of its seed; the FP row's value is "
             "the floor. `closed`: share of the same bits' PTQ distance to the FP row that "
             "the row closes, per metric.", "",
             "| row | accuracy | FID | FID to FP | FID to FP's other seeds | similarity | "
             "motion err | closed: FID to FP | closed: FID to other seeds | closed: similarity "
             "| closed: motion |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = ("frame_fid", "frame_fid_other_seeds", "consecutive_similarity", "motion_error")
    for row in rows:
        ptq = reference_ptq(row, rows)
        closed = [f"{gap_closed(row[key], ptq[key], fp[key]):.0%}" if ptq and row is not ptq else ""
                  for key in keys]
        other = row.get("frame_fid_other_seeds")
        lines.append(f"| {row['name']} | {row['frame_accuracy']:.1%} | {row['frame_fid_real']:.2f} | "
                     f"{max(row['frame_fid'], 0.0):.2f} | {'' if other is None else f'{other:.2f}'} | "
                     f"{row['consecutive_similarity']:.4f} | {row['motion_error']:.3f} | "
                     + " | ".join(closed) + " |")
    if any(row.get("log") for row in rows):
        lines += ["", f"![loss and Phi rank]({report}-training.png)"]
    lines += ["", f"![frames: FP, PTQ, qdiff + Phi]({report}-frames.png)"]
    write_markdown(RESULTS / f"{report}.md", "\n".join(lines) + "\n")


def plot_training(rows: list[dict], path: Path, window: int) -> None:
    """Loss (mean over the last `window` steps: one trajectory, whose steps differ by orders
    of magnitude) and Phi rank against steps for the trained rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (loss_ax, rank_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    logged: dict[str, str] = {}  # each run once (a run with an average scores two rows)
    for row in (r for r in rows if r.get("log")):
        logged.setdefault(row["log"], row["name"])
    for log_path, name in logged.items():
        log = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
        steps = [entry["step"] for entry in log]
        losses = torch.tensor([entry["loss"] for entry in log])
        # from the first full window on: a partial one holds only the first trajectory's
        # noisiest steps, whose loss differs from the rest's
        smoothed = [losses[i + 1 - window:i + 1].mean().item() for i in range(window - 1, len(losses))]
        loss_ax.plot(steps[window - 1:], smoothed, label=name, lw=0.8)
        rank_ax.plot(steps, [entry.get("aux_rank", 0) for entry in log], label=name)
    loss_ax.set(xlabel="step", ylabel="loss", yscale="log",
                title=f"distillation loss (mean of {window} steps)")
    rank_ax.set(xlabel="step", ylabel="Phi rank", title="auxiliary rank")
    for ax in (loss_ax, rank_ax):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--num-videos", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="20 videos, 40 training steps, W4A4")
    parser.add_argument("--report", default="video",
                        help="write eval/results/REPORT.md, .json and PNGs (a variant need not "
                             "replace the table)")
    parser.add_argument("--label", help="appended to every sampled row's name, e.g. \"full QAT\" "
                                         "when the overrides change what a row is")
    parser.add_argument("--ptq-from", metavar="REPORT",
                        help="measure the gaps closed against REPORT's calibrated PTQ rows "
                             "(eval/results/REPORT.json, the same FP videos) where --rows has none")
    parser.add_argument("overrides", nargs="*", help="key=value for every row's recipe")
    args = parser.parse_args(argv)
    names = [n for n in ROWS if n.startswith("W4A4")] if args.quick else args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows: {list(ROWS)}")
    require_matplotlib("python -m eval.video")
    report = args.report + ("-quick" if args.quick else "")
    extra = [*(QUICK if args.quick else []), *args.overrides]
    num_videos = 20 if args.quick else args.num_videos
    cfg = load_config(CONFIGS / "tiny-wan-w4a4.yaml")
    pipe = qdiff.load_pipeline(cfg.model.path)
    net, _ = load_feature_net("digits")
    real = real_frames_pool(net)
    labels = balanced_labels(num_videos)
    settings = SamplingSettings(num_videos, cfg.eval.steps, cfg.eval.guidance_scale, cfg.eval.seed,
                                batch_size=50)
    cache, teacher = Path("runs") / "video-fp-cache", weights_digest(Path(cfg.model.path))
    fp_videos = teacher_videos(pipe, labels, settings, teacher, cache)
    # The same teacher on other seeds: how far two FP samples lie apart (the noise floor).
    # Batch b draws from seed + b, so these start after the FP row's last seed.
    other_seeds = dataclasses.replace(
        settings, seed=settings.seed + math.ceil(num_videos / settings.batch_size))
    fp_other_videos = teacher_videos(pipe, labels, other_seeds, teacher, cache)
    fp_other_pool = frame_features(net, fp_other_videos).pool
    command = shlex.join(["python", "-m", "eval.video", *(sys.argv[1:] if argv is None else argv)])

    def scored(name: str, videos: torch.Tensor, extra_fields: dict) -> dict:
        metrics = video_metrics(net, videos, labels, reference=fp_videos, real_pool=real)
        if videos is not fp_other_videos:  # against itself it would read 0
            metrics["frame_fid_other_seeds"] = frame_fid(frame_features(net, videos).pool,
                                                         fp_other_pool)
        row = {"name": name, "frames": videos.shape[1], **metrics, **extra_fields}
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        return row

    rows = [scored("FP (teacher)", fp_videos, {}), scored("FP, other seeds", fp_other_videos, {})]
    if args.ptq_from:
        sampled_ptq = {name[:4] for name in names if "calibrated PTQ" in name}
        rows += [r for r in borrowed_ptq_rows(args.ptq_from, rows[0], num_videos)
                 if r["name"][:4] not in sampled_ptq]
    suffix = f" ({args.label})" if args.label else ""
    strips = {"FP (teacher)": fp_videos}
    with tempfile.TemporaryDirectory(prefix="qdiff-video-") as tmp:
        for name in names:
            for label, exported, fields in run_row(pipe, name, Path(tmp), extra):
                label += suffix
                videos = sample_videos(exported, labels, settings)
                rows.append(scored(label, videos, fields))
                strips[label] = videos
                write_table(rows, cfg, num_videos, command, report)  # a crash keeps the rows so far
    if any(row.get("log") for row in rows):  # PTQ rows alone have no training to plot
        plot_training(rows, RESULTS / f"{report}-training.png", cfg.distill.trajectory_steps)
    shown = [n for n in ("FP (teacher)", f"W4A4 calibrated PTQ{suffix}", f"W4A4 qdiff + Phi{suffix}")
             if n in strips]
    picks = torch.tensor([int((labels == c).nonzero()[0]) for c in STRIP_CLASSES])
    strip = torch.cat([frames_side_by_side(strips[n][picks]) for n in shown])  # (N, F, C, H, W)
    save_image(strip, RESULTS / f"{report}-frames.png", nrow=1, padding=2, pad_value=0.5)
    print((RESULTS / f"{report}.md").read_text())


if __name__ == "__main__":
    main()
