"""eval/video/seeds.py: issue 7's claims over training seeds, gathered from eval/video/video.py's
reports. docs/notes/research-log.md quotes its means, closed shares and paired intervals, so
their arithmetic, the seed check and the refusals are pinned here on made-up reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.video import seeds


@pytest.fixture(scope="module")
def seeds_script():
    return seeds


def row(name: str, fid: float, other: float | None = 0.4, motion: float = 0.15,
        similarity: float = 0.975) -> dict:
    scored = {"name": name, "frame_accuracy": 0.9, "frame_fid": fid, "motion_error": motion,
              "consecutive_similarity": similarity}
    if other is not None:
        scored["frame_fid_other_seeds"] = other
    return scored


FP = {**row("FP (teacher)", 0.0, other=0.3, motion=0.0, similarity=0.98), "frame_fid_real": 5.5536}
PTQ = row("W4A4 calibrated PTQ", 0.5, other=0.7, motion=0.2, similarity=0.97)


@pytest.fixture
def results(seeds_script, tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(seeds_script, "RESULTS", tmp_path)
    write_report(tmp_path, "ptq", [FP, PTQ])
    return tmp_path


def write_report(results: Path, name: str, rows: list[dict], seed: int = 0, fp: dict = FP) -> None:
    command = f"python -m eval.video --report {name}" + (f" seed={seed}" if seed else "")
    (results / f"{name}.json").write_text(json.dumps({"command": command, "rows": [fp, *rows]}))


def variant(seeds_script, name: str, fids: dict[int, float], results: Path,
            metrics: dict[int, dict] | None = None):
    """A variant whose run at each seed is its own report, as eval/video/video.py writes them;
    `metrics`: a seed's other metrics where they are not `row`'s defaults."""
    metrics = metrics or {}
    runs = {}
    for seed, fid in fids.items():
        report = f"{name}-seed{seed}"
        write_report(results, report, [row("W4A4 qdiff", fid, **metrics.get(seed, {}))], seed)
        runs[seed] = (report, "W4A4 qdiff")
    return seeds_script.Variant(name, ("ptq", "W4A4 calibrated PTQ"), runs)


def test_variant_means_and_gaps_closed_over_seeds(seeds_script, results):
    summary = seeds_script.variant_summary(variant(seeds_script, "v", {0: 0.09, 1: 0.14, 2: 0.13},
                                                   results))
    assert summary["seeds"] == [0, 1, 2]
    assert summary["mean"]["frame_fid"] == pytest.approx(0.12)
    assert summary["closed"]["frame_fid"] == pytest.approx(0.76)  # (0.5 - 0.12) / 0.5
    assert summary["closed"]["frame_fid_other_seeds"] == pytest.approx(0.75)  # 0.3 / 0.4 above the floor
    assert summary["closed"]["motion_error"] == pytest.approx(0.25)
    assert summary["closed"]["consecutive_similarity"] == pytest.approx(0.5)
    assert summary["mark_fid"] == pytest.approx(0.1)
    assert summary["seeds_at_mark"] == 1  # 82%; 72% and 74% fall short


def test_a_metric_an_older_report_lacks_is_averaged_over_the_seeds_that_have_it(seeds_script, results):
    summary = seeds_script.variant_summary(
        variant(seeds_script, "v", {0: 0.1, 1: 0.2}, results, {1: {"other": None}}))
    assert summary["per_seed"]["frame_fid_other_seeds"] == [0.4, None]
    assert summary["mean"]["frame_fid_other_seeds"] == pytest.approx(0.4)
    line = seeds_script.variant_lines([summary])[-1]
    assert "| 0.40 (75%; 1 of 2 seeds) |" in line


def test_phi_pairs_differences_interval_and_nearer_count(seeds_script, results):
    without = seeds_script.variant_summary(variant(
        seeds_script, "without", {0: 0.12, 1: 0.16, 2: 0.14}, results,
        {s: {"similarity": 0.975} for s in range(3)}))
    with_phi = seeds_script.variant_summary(variant(
        seeds_script, "with", {0: 0.10, 1: 0.17, 2: 0.12, 3: 0.11}, results,
        {0: {"similarity": 0.976}, 1: {"similarity": 0.974}, 2: {"similarity": 0.975}}))
    fid, *_, similarity = (seeds_script.paired(without, with_phi, m) for m in seeds_script.METRICS)
    assert fid["seeds"] == [0, 1, 2]  # seed 3 has no run without Phi to compare
    assert fid["differences"] == pytest.approx([-0.02, 0.01, -0.02])
    assert fid["mean"] == pytest.approx(-0.01)
    # mean +- t(0.975, 2 dof) * stdev / sqrt(3): 4.302653 * 0.0173205 / 1.7320508
    assert fid["interval"] == pytest.approx([-0.01 - 0.04302653, -0.01 + 0.04302653], abs=1e-7)
    assert fid["phi_nearer"] == 2  # lower is nearer
    assert similarity["phi_nearer"] == 1  # higher is nearer; a tie is not nearer


def test_one_shared_seed_has_no_interval(seeds_script, results):
    without = seeds_script.variant_summary(variant(seeds_script, "without", {0: 0.12}, results))
    with_phi = seeds_script.variant_summary(variant(seeds_script, "with", {0: 0.10}, results))
    fid = seeds_script.paired(without, with_phi, seeds_script.METRICS[0])
    assert fid["interval"] is None and fid["mean"] == pytest.approx(-0.02)


@pytest.mark.parametrize("command, seed", [
    ("python -m eval.video --report r", 0),
    ("python -m eval.video --report r distill.steps=1200 seed=2", 2),
    ("python -m eval.video --label 'seed=5 in a label' eval.seed=3", 0),
])
def test_seed_of_reads_the_training_seed_override(seeds_script, command, seed):
    assert seeds_script.seed_of(command) == seed


def test_a_report_filed_under_the_wrong_seed_is_refused(seeds_script, results):
    write_report(results, "r", [row("W4A4 qdiff", 0.1)], seed=1)
    with pytest.raises(SystemExit, match=r"r ran seed 1 .*files it under seed 2: fix its seed"):
        seeds_script.report_rows(("r", "W4A4 qdiff"), seed=2)


def test_a_run_on_other_fp_videos_than_its_ptq_is_refused(seeds_script, results):
    write_report(results, "rounded", [row("W4A4 qdiff", 0.1)],
                 fp={**FP, "frame_fid_real": FP["frame_fid_real"] * (1 + 2e-7)})  # another CPU
    write_report(results, "other", [row("W4A4 qdiff", 0.1)], fp={**FP, "frame_fid_real": 5.61})
    ptq = ("ptq", "W4A4 calibrated PTQ")
    rounded = seeds_script.Variant("v", ptq, {0: ("rounded", "W4A4 qdiff")})
    assert seeds_script.variant_summary(rounded)["mean"]["frame_fid"] == pytest.approx(0.1)
    with pytest.raises(SystemExit, match=r"other scored other FP videos .*5\.610000 against 5\.553600"):
        seeds_script.variant_summary(seeds_script.Variant("v", ptq, {0: ("other", "W4A4 qdiff")}))


def test_a_missing_row_names_the_rows_there_are(seeds_script, results):
    write_report(results, "r", [row("W4A4 qdiff", 0.1)])
    with pytest.raises(SystemExit, match=r"r has no row 'W4A4 qdiff \+ Phi'; its rows: "
                                         r"\['FP \(teacher\)', 'W4A4 qdiff'\]"):
        seeds_script.report_rows(("r", "W4A4 qdiff + Phi"), seed=0)


def test_a_missing_report_says_how_to_make_it(seeds_script, results):
    with pytest.raises(SystemExit, match=r"nowhere\.json does not exist: run python -m eval\.video with "
                                         r"--report nowhere"):
        seeds_script.report_rows(("nowhere", "W4A4 qdiff"), seed=0)


def test_the_committed_table_is_what_the_committed_reports_give(seeds_script):
    """Every run VARIANTS names exists, ran the seed it is filed under, and the committed
    eval/results/video/video-seeds.json is what they give now (no report changed under it)."""
    committed = json.loads((seeds_script.RESULTS / f"{seeds_script.REPORT}.json").read_text())
    summaries = [seeds_script.variant_summary(v) for v in seeds_script.VARIANTS]
    assert json.loads(json.dumps(summaries)) == committed["variants"]
    names = [s["name"] for s in summaries]
    assert [[p["without"], p["with"]] for p in committed["phi_pairs"]] == \
        [list(pair) for pair in seeds_script.PHI_PAIRS]
    assert all(without in names and with_phi in names for without, with_phi in seeds_script.PHI_PAIRS)
