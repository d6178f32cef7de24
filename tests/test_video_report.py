"""eval/video/video.py's report: the share of calibrated PTQ's distance each row closes, and the PTQ
rows that --ptq-from borrows from an earlier report, only when it scored the same FP videos.
docs/notes/research-log.md quotes these closed columns, so their arithmetic and row matching are pinned here."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from eval.video import video as video_module


@pytest.fixture(scope="module")
def video():
    return video_module


@pytest.fixture
def results(video, tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(video, "RESULTS", tmp_path)
    return tmp_path


def row(name: str, fid: float, other: float | None, similarity: float, motion: float,
        fid_real: float = 5.0) -> dict:
    scored = {"name": name, "frames": 8, "frame_accuracy": 0.9, "frame_fid": fid,
              "frame_fid_real": fid_real, "consecutive_similarity": similarity,
              "motion_error": motion}
    if other is not None:
        scored["frame_fid_other_seeds"] = other
    return scored


FP = row("FP (teacher)", 0.0, 0.3, 0.98, 0.0, fid_real=5.5536)
FP_OTHER = row("FP, other seeds", 0.3, None, 0.981, 0.7)
W4_PTQ = row("W4A4 calibrated PTQ", 0.5, 0.7, 0.97, 0.2)
W3_PTQ = row("W3A3 calibrated PTQ", 10.0, 9.3, 0.95, 0.4)
CFG = SimpleNamespace(eval=SimpleNamespace(steps=20, guidance_scale=4.5))  # what the header reads


def write_earlier_report(results: Path, name: str, rows: list[dict], num_videos: int = 400) -> None:
    (results / f"{name}.json").write_text(json.dumps({"num_videos": num_videos, "rows": rows}))


def closed_cells(table: str, name: str) -> list[str]:
    """The four `closed` cells of the table row named `name`."""
    line = next(row for row in table.splitlines() if row.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][-4:]


def test_closed_columns_against_this_runs_ptq(video, results):
    rows = [FP, FP_OTHER, W4_PTQ, row("W4A4 qdiff", 0.1, 0.4, 0.975, 0.15),
            row("W3A3 qdiff", 4.0, 3.3, 0.96, 0.3)]
    video.write_table(rows, CFG, 400, "python -m eval.video", "report")
    table = (results / "report.md").read_text()
    # (PTQ - row) / (PTQ - FP): 0.4/0.5, 0.3/0.4 above the other-seed floor, 0.005/0.01, 0.05/0.2
    assert closed_cells(table, "W4A4 qdiff") == ["80%", "75%", "50%", "25%"]
    assert closed_cells(table, "W4A4 calibrated PTQ") == ["", "", "", ""]  # not against itself
    assert closed_cells(table, "W3A3 qdiff") == ["", "", "", ""]  # no W3A3 PTQ to close
    assert json.loads((results / "report.json").read_text())["rows"] == rows


def test_borrowed_ptq_rows_fill_the_closed_columns(video, results):
    write_earlier_report(results, "earlier", [FP, FP_OTHER, W4_PTQ, W3_PTQ,
                                              row("W4A4 qdiff", 0.2, 0.5, 0.975, 0.15)])
    # FP videos sampled on another CPU differ in the last bits (5.553609 against 5.553610)
    rounded_fp = {**FP, "frame_fid_real": FP["frame_fid_real"] * (1 + 2e-7)}
    borrowed = video.borrowed_ptq_rows("earlier", rounded_fp, 400)
    assert [r["name"] for r in borrowed] == ["W4A4 calibrated PTQ (from earlier)",
                                             "W3A3 calibrated PTQ (from earlier)"]
    assert borrowed[0]["frame_fid"] == W4_PTQ["frame_fid"]
    labelled = row("W4A4 qdiff (full QAT)", 0.1, 0.4, 0.975, 0.15)
    rows = [FP, FP_OTHER, *borrowed, labelled, row("W3A3 qdiff (full QAT)", 4.0, 3.3, 0.96, 0.3)]
    assert video.reference_ptq(labelled, rows) is borrowed[0]
    assert video.reference_ptq(rows[-1], rows) is borrowed[1]
    video.write_table(rows, CFG, 400, "python -m eval.video", "variant")
    table = (results / "variant.md").read_text()
    assert closed_cells(table, "W4A4 qdiff (full QAT)") == ["80%", "75%", "50%", "25%"]
    # (10 - 4) / 10 = 60%, (9.3 - 3.3) / (9.3 - 0.3) = 67%
    assert closed_cells(table, "W3A3 qdiff (full QAT)")[:2] == ["60%", "67%"]


@pytest.mark.parametrize("earlier_rows, num_videos, message", [
    ([FP, FP_OTHER, W4_PTQ], 200, r"its FP videos differ .*400 videos.* against 200"),
    ([{**FP, "frame_fid_real": 5.5541}, FP_OTHER, W4_PTQ], 400,
     r"FID 5\.554100 against 400, 5\.553600.*Run the PTQ row here"),
    ([FP, FP_OTHER, row("W4A4 qdiff", 0.2, 0.5, 0.975, 0.15)], 400, "has no calibrated PTQ row"),
])
def test_borrowing_is_refused_unless_the_fp_videos_match(video, results, earlier_rows, num_videos,
                                                         message):
    write_earlier_report(results, "earlier", earlier_rows)
    with pytest.raises(SystemExit, match=message):
        video.borrowed_ptq_rows("earlier", FP, num_videos)


def test_borrowing_a_missing_report_names_where_reports_are(video, results):
    with pytest.raises(SystemExit, match=r"--ptq-from nowhere: .*nowhere\.json does not exist"):
        video.borrowed_ptq_rows("nowhere", FP, 400)
