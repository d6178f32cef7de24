"""Issue 7's two claims over training seeds, from eval/video/video.py's committed reports.

    python -m eval.video.seeds    # -> eval/results/video/video-seeds.md, .json, .png

One eval/video/video.py run is one training seed, and the seed moves a W4A4 student's FID to FP
by about 0.04: as much as the differences the issue asks about (Phi against no Phi, 80%
of calibrated PTQ's distance closed). This script trains and samples nothing. It gathers
the same variant's reports over seeds (VARIANTS: seed -> report and row), checks that each
report's command ran the seed it is filed under, and writes:
- per variant: each seed's FID to FP, the means over seeds of every metric, the share of
  calibrated PTQ's distance the means close, and in how many seeds a run closes 80%;
- per Phi pair (the same steps and seeds, Phi the only difference): Phi's difference at
  each shared seed, its mean, the 95% interval of that mean (Student's t over the seeds),
  and in how many seeds Phi is nearer the teacher.
Each variant's gaps are closed against one calibrated PTQ row (seed 0's: the PTQ of
another seed calibrates on other trajectories, and no report has one).
A new seed is one eval/video/video.py run (`seed=N --report NAME`) and one line in VARIANTS.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
import textwrap
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import t as student_t

from eval.common.plotting import require_matplotlib
from eval.common.report import results_dir, write_json, write_markdown
from eval.video.gaps import gap_closed, same_fp_videos

RESULTS = results_dir("video")
REPORT = "video-seeds"
MARK = 0.8  # issue 7: close at least 80% of calibrated PTQ's distance to FP

Run = tuple[str, str]  # (report in eval/results, row name in it)


@dataclass(frozen=True)
class Variant:
    name: str
    ptq: Run  # the calibrated PTQ whose distance to FP the runs close
    runs: dict[int, Run]  # training seed -> its report and row


@dataclass(frozen=True)
class Metric:
    key: str  # in a report's row
    title: str
    nearer_is_higher: bool  # similarity: the students sit below FP's


METRICS = (Metric("frame_fid", "FID to FP", False),
           Metric("frame_fid_other_seeds", "FID to FP's other seeds", False),
           Metric("motion_error", "motion err", False),
           Metric("consecutive_similarity", "similarity", True))

RECIPE_PTQ = ("video", "W4A4 calibrated PTQ")
GROUPS_8_PTQ = ("video-act-groups-8", "W4A4 calibrated PTQ")
QAT_1200 = "W4A4 qdiff (full QAT, 1200 steps)"
PHI_QAT_1200 = "W4A4 qdiff + Phi (full QAT, 1200 steps)"
PHI_200 = "W4A4 qdiff + Phi (full QAT, 1200 steps, Phi phases of 200)"
VARIANTS = (
    Variant("QALoRA, 600 steps", RECIPE_PTQ,
            {0: ("video", "W4A4 qdiff"), 1: ("video-seed1", "W4A4 qdiff")}),
    Variant("QALoRA + Phi, 600 steps", RECIPE_PTQ,
            {0: ("video", "W4A4 qdiff + Phi"),
             1: ("video-rotated-ema-seed1", "W4A4 qdiff + Phi, last step's weights")}),
    Variant("full QAT, 600 steps", GROUPS_8_PTQ,
            {0: ("video-qat-groups-8", "W4A4 qdiff"), 1: ("video-qat-groups-8-seed1", "W4A4 qdiff")}),
    Variant("full QAT + Phi, 600 steps", GROUPS_8_PTQ,
            {0: ("video-qat-groups-8", "W4A4 qdiff + Phi"),
             1: ("video-qat-groups-8-seed1", "W4A4 qdiff + Phi")}),
    Variant("full QAT, 1200 steps", GROUPS_8_PTQ,
            {0: ("video-qat-steps1200-groups-8", "W4A4 qdiff"),
             1: ("video-qat-steps1200-groups-8-seed1", QAT_1200),
             2: ("video-qat-steps1200-groups-8-seed2", QAT_1200)}),
    Variant("full QAT + Phi, 1200 steps", GROUPS_8_PTQ,
            {0: ("video-qat-steps1200-groups-8", "W4A4 qdiff + Phi"),
             1: ("video-qat-steps1200-groups-8-seed1", PHI_QAT_1200),
             2: ("video-qat-steps1200-phi-groups-8-seed2", PHI_QAT_1200)}),
    Variant("full QAT + Phi in phases of 200, 1200 steps", GROUPS_8_PTQ,
            {0: ("video-qat-steps1200-phi-phases200-groups-8", PHI_200),
             1: ("video-qat-steps1200-phi-phases200-groups-8-seed1", PHI_200),
             2: ("video-qat-steps1200-phi-phases200-groups-8-seed2", PHI_200)}),
    Variant("full QAT, 2400 steps", GROUPS_8_PTQ,
            {1: ("video-qat-steps2400-groups-8-seed1", "W4A4 qdiff (full QAT, 2400 steps)")}),
)
# (without Phi, with Phi): the same training but for Phi
PHI_PAIRS = (("QALoRA, 600 steps", "QALoRA + Phi, 600 steps"),
             ("full QAT, 600 steps", "full QAT + Phi, 600 steps"),
             ("full QAT, 1200 steps", "full QAT + Phi, 1200 steps"),
             ("full QAT, 1200 steps", "full QAT + Phi in phases of 200, 1200 steps"))


def load_report(report: str) -> dict:
    path = RESULTS / f"{report}.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run python -m eval.video with --report {report} "
                         "(its command is in docs/notes/research-log.md), or take its line out "
                         "of VARIANTS")
    return json.loads(path.read_text())


def seed_of(command: str) -> int:
    """The training seed an eval/video/video.py command ran (`seed=N`; the config's 0 without it)."""
    seeds = [m[1] for m in map(re.compile(r"seed=(\d+)").fullmatch, shlex.split(command)) if m]
    return int(seeds[-1]) if seeds else 0


def report_rows(run: Run, seed: int | None = None) -> tuple[dict, dict]:
    """The report's FP row and its row named in `run`, refused where the report ran
    another seed than `seed`."""
    report, name = run
    scored = load_report(report)
    ran = seed_of(scored["command"])
    if seed is not None and ran != seed:
        raise SystemExit(f"{report} ran seed {ran} ({scored['command']}), "
                         f"where VARIANTS files it under seed {seed}: fix its seed there")
    rows = {row["name"]: row for row in scored["rows"]}
    if name not in rows:
        raise SystemExit(f"{report} has no row {name!r}; its rows: {list(rows)}")
    return scored["rows"][0], rows[name]


def mean_of(values: list[float | None]) -> float | None:
    """Mean over the runs that measured it (reports older than a metric lack it)."""
    measured = [v for v in values if v is not None]
    return statistics.fmean(measured) if measured else None


def variant_summary(variant: Variant) -> dict:
    # the PTQ report's FP row: FID to FP 0, the other seeds' floor, FP's similarity
    fp, ptq = report_rows(variant.ptq)
    runs = {}
    for seed, run in sorted(variant.runs.items()):
        own_fp, runs[seed] = report_rows(run, seed)
        if not same_fp_videos(own_fp, fp):  # gaps against that PTQ would mean nothing
            raise SystemExit(f"{run[0]} scored other FP videos than its variant's PTQ report (FP "
                             f"FID to real {own_fp['frame_fid_real']:.6f} against "
                             f"{fp['frame_fid_real']:.6f}): name a PTQ of the same teacher and settings")
    per_seed = {m.key: [row.get(m.key) for row in runs.values()] for m in METRICS}
    mean = {key: mean_of(values) for key, values in per_seed.items()}
    fids = per_seed["frame_fid"]
    return {"name": variant.name, "seeds": list(runs), "ptq": variant.ptq, "per_seed": per_seed,
            "mean": mean,
            "closed": {m.key: None if mean[m.key] is None else
                       gap_closed(mean[m.key], ptq[m.key], fp[m.key]) for m in METRICS},
            "accuracy": statistics.fmean(row["frame_accuracy"] for row in runs.values()),
            "seeds_at_mark": sum(gap_closed(f, ptq["frame_fid"], fp["frame_fid"]) >= MARK
                                 for f in fids),
            "mark_fid": ptq["frame_fid"] - MARK * (ptq["frame_fid"] - fp["frame_fid"])}


def paired(without: dict, with_phi: dict, metric: Metric) -> dict:
    """Phi's difference at every seed both variants measured, and its mean's 95% interval."""
    def at(summary: dict, seed: int) -> float | None:
        if seed not in summary["seeds"]:
            return None
        return summary["per_seed"][metric.key][summary["seeds"].index(seed)]

    seeds = [s for s in without["seeds"] if at(without, s) is not None and at(with_phi, s) is not None]
    if not seeds:
        return {"metric": metric.key, "seeds": [], "differences": [], "mean": None,
                "interval": None, "phi_nearer": 0}
    differences = [at(with_phi, s) - at(without, s) for s in seeds]
    mean = statistics.fmean(differences)
    half = (student_t.ppf(0.975, len(seeds) - 1) * statistics.stdev(differences) / len(seeds) ** 0.5
            if len(seeds) > 1 else None)
    nearer = sum((d > 0) == metric.nearer_is_higher and d != 0 for d in differences)
    return {"metric": metric.key, "seeds": seeds, "differences": differences, "mean": mean,
            "interval": None if half is None else [mean - half, mean + half], "phi_nearer": nearer}


def with_closed(values: list[float | None], mean: float | None, gap: float | None, digits: int) -> str:
    """'mean (closed)', naming how many seeds measured it where some reports lack it."""
    if mean is None:
        return ""
    measured = sum(v is not None for v in values)
    seeds = "" if measured == len(values) else f"; {measured} of {len(values)} seeds"
    return f"{mean:.{digits}f} ({gap:.0%}{seeds})"


def variant_lines(summaries: list[dict]) -> list[str]:
    lines = ["| variant | seeds | FID to FP at each seed | mean | closed | seeds at 80% "
             "| FID to other seeds (closed) | motion err (closed) | similarity (closed) | accuracy |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        mean, gap = s["mean"], s["closed"]
        per_seed = ", ".join(f"{v:.3f}" for v in s["per_seed"]["frame_fid"])
        lines.append(
            f"| {s['name']} | {', '.join(map(str, s['seeds']))} | {per_seed} | "
            f"{mean['frame_fid']:.3f} | {gap['frame_fid']:.0%} | {s['seeds_at_mark']} of "
            f"{len(s['seeds'])} (<= {s['mark_fid']:.3f}) | "
            + " | ".join(with_closed(s["per_seed"][key], mean[key], gap[key], digits) for key, digits in
                         (("frame_fid_other_seeds", 2), ("motion_error", 3),
                          ("consecutive_similarity", 4)))
            + f" | {s['accuracy']:.1%} |")
    return lines


def pair_lines(pairs: list[dict]) -> list[str]:
    lines = ["| Phi against no Phi | metric | seeds | Phi minus no Phi at each seed | mean "
             "| 95% interval | Phi nearer in |", "|---|---|---|---|---:|---:|---:|"]
    titles = {m.key: m.title for m in METRICS}
    for pair in pairs:
        for c in (c for c in pair["comparisons"] if c["seeds"]):  # none: older reports lack it
            digits = 4 if c["metric"] == "consecutive_similarity" else 3
            interval = ("" if c["interval"] is None else
                        f"[{c['interval'][0]:+.{digits}f}, {c['interval'][1]:+.{digits}f}]")
            lines.append(f"| {pair['with']} | {titles[c['metric']]} | "
                         f"{', '.join(map(str, c['seeds']))} | "
                         + ", ".join(f"{d:+.{digits}f}" for d in c["differences"])
                         + f" | {c['mean']:+.{digits}f} | {interval} | "
                         f"{c['phi_nearer']} of {len(c['seeds'])} |")
    return lines


def plot(summaries: list[dict], path: Path) -> None:
    """FID to FP of every run (one dot per seed), each variant's mean and its 80% mark."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for x, s in enumerate(summaries):
        for seed, fid in zip(s["seeds"], s["per_seed"]["frame_fid"]):
            ax.scatter(x, fid, color=f"C{seed}", s=18, zorder=3, label=f"seed {seed}")
        ax.hlines(s["mean"]["frame_fid"], x - 0.3, x + 0.3, color="black", lw=1.2)
        ax.hlines(s["mark_fid"], x - 0.3, x + 0.3, color="red", lw=1, ls="--")
    ax.plot([], [], color="black", label="mean over seeds")
    ax.plot([], [], color="red", ls="--", label="80% of PTQ's distance closed")
    ax.set_xticks(range(len(summaries)), [textwrap.fill(s["name"], 15) for s in summaries],
                  fontsize=7)
    ax.set(ylabel="FID to FP", title="W4A4 students of the embedded video teacher, by training seed")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one entry per seed, not per dot
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(summaries: list[dict], pairs: list[dict]) -> None:
    write_json(RESULTS / f"{REPORT}.json", {"command": "python -m eval.video.seeds", "variants": summaries, "phi_pairs": pairs})
    lines = ["# The embedded video teacher's W4A4 students over training seeds", "",
             "Command: `python -m eval.video.seeds` (gathers eval/video/video.py's reports; trains and "
             "samples nothing). W4A4, 400 videos per run, the same FP videos for every run. "
             "`closed`: the share of calibrated PTQ's distance to FP that the mean over seeds "
             "closes (QALoRA rows: the recipe's PTQ, "
             f"[`{RECIPE_PTQ[0]}.md`]({RECIPE_PTQ[0]}.md); full QAT rows, activations in groups "
             f"of 8: [`{GROUPS_8_PTQ[0]}.md`]({GROUPS_8_PTQ[0]}.md)). `seeds at 80%`: runs "
             "whose own FID to FP closes issue 7's 80%. Each run's report:", ""]
    for variant in VARIANTS:
        reports = ", ".join(f"seed {seed} [`{report}.md`]({report}.md)"
                            for seed, (report, _) in sorted(variant.runs.items()))
        lines.append(f"- {variant.name}: {reports}")
    lines += ["", *variant_lines(summaries), "",
              "Phi against the same training without it, at the seeds both ran: the difference "
              "(Phi minus no Phi; lower is nearer the teacher except for the similarity, where "
              "higher is), its mean over seeds, the 95% interval of that mean (Student's t; "
              "none from one seed) and in how many seeds Phi is nearer.", "",
              *pair_lines(pairs), "", f"![FID to FP by seed]({REPORT}.png)"]
    write_markdown(RESULTS / f"{REPORT}.md", "\n".join(lines) + "\n")


def main() -> None:
    require_matplotlib("python -m eval.video.seeds")
    summaries = [variant_summary(v) for v in VARIANTS]
    by_name = {s["name"]: s for s in summaries}
    pairs = [{"without": without, "with": with_phi,
              "comparisons": [paired(by_name[without], by_name[with_phi], m) for m in METRICS]}
             for without, with_phi in PHI_PAIRS]
    write_report(summaries, pairs)
    plot(summaries, RESULTS / f"{REPORT}.png")
    print((RESULTS / f"{REPORT}.md").read_text())


if __name__ == "__main__":
    main()
