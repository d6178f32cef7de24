"""eval/: the benchmark suites' common report writer, and the recovered provenance of the
committed results (eval/results/PROVENANCE.md lists every results file)."""

from __future__ import annotations

import json
import subprocess
import sys

from eval.common import provenance, report

SUITES = ("quality", "video", "speed", "training_cost", "memory")


def test_every_results_file_is_in_a_suite_folder_and_listed_in_the_provenance():
    loose = [p.name for p in report.RESULTS.iterdir() if p.is_file() and p.name not in provenance.OWN_FILES]
    assert loose == [], "results belong in eval/results/<suite>/"
    assert {p.name for p in report.RESULTS.iterdir() if p.is_dir()} <= set(SUITES)
    files = {p.relative_to(report.RESULTS).as_posix() for p in provenance.results_files()}
    listed = json.loads((report.RESULTS / "provenance.json").read_text())
    assert {e["file"] for e in listed["files"]} == files, "run python -m eval.common.provenance"
    table = (report.RESULTS / "PROVENANCE.md").read_text()
    assert "Recovered after the fact" in table
    assert f"](../../{provenance.STUDIES}/PROVENANCE.md)" in table, "the studies' folder is named as not covered"
    assert (report.ROOT / provenance.STUDIES / "PROVENANCE.md").is_file()
    assert all(f"]({f})" in table for f in files), "run python -m eval.common.provenance"
    assert all(e["commit"] != provenance.NOT_RECORDED for e in listed["files"])


def test_stated_command_and_machine_are_read_from_the_file_and_its_report(tmp_path):
    md = tmp_path / "speed.md"
    md.write_text("# Speed\n\nCommand: `python eval/speed.py --quick`\n\n"
                  "CPU (AVX2, AMD EPYC), 2 thread(s), torch 2.1; integer kernel\n")
    (tmp_path / "speed.png").write_bytes(b"\x89PNG")
    (tmp_path / "bare.md").write_text("# no command here\n")
    assert provenance.stated(md) == ("python eval/speed.py --quick", "CPU (AVX2, AMD EPYC), 2 thread(s), torch 2.1")
    assert provenance.stated(tmp_path / "bare.md") == (None, None)
    assert provenance.report_of(tmp_path / "speed.png") == md
    (tmp_path / "video-x-frames.png").write_bytes(b"")
    (tmp_path / "video-x.md").write_text("Command: `python eval/video.py`\n")
    assert provenance.report_of(tmp_path / "video-x-frames.png") == tmp_path / "video-x.md"


def test_the_report_writer_adds_schema_and_provenance_to_the_payload(tmp_path):
    path = tmp_path / "speed" / "x.json"
    written = report.write_json(path, {"rows": [{"a": 1}], "command": "python -m eval.speed"}, command="c --x")
    on_disk = json.loads(path.read_text())
    assert on_disk == written and on_disk["schema"] == report.SCHEMA and on_disk["rows"] == [{"a": 1}]
    prov = on_disk["provenance"]
    assert {"qdiff_version", "git_commit", "git_dirty", "torch_version", "python", "command", "machine",
            "created"} <= set(prov)
    assert prov["command"] == "c --x" and {"cpu", "cores", "platform", "flags"} <= set(prov["machine"])
    report.write_markdown(tmp_path / "x.md", "# table\n", command="c --x")
    last = (tmp_path / "x.md").read_text().splitlines()[-1]
    assert last.startswith("Provenance: qdiff ") and "`c --x`" in last


def test_every_suite_runs_as_a_module_from_the_repository_root():
    for suite in SUITES:
        out = subprocess.run([sys.executable, "-m", f"eval.{suite}", "--help"], cwd=report.ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "usage: python -m eval." in out.stdout, (suite, out.stderr[-2000:])


def test_a_rewritten_report_does_not_mark_the_code_dirty(tmp_path, monkeypatch):
    """The JSON a run wrote is tracked and changed when its Markdown asks for provenance:
    only changes outside eval/results/ make a report's commit 'with uncommitted changes'."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    (tmp_path / "eval" / "results").mkdir(parents=True)
    (tmp_path / "eval" / "results" / "r.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    (tmp_path / "eval" / "results" / "r.json").write_text('{"rows": []}')
    assert report.provenance("cmd")["git_dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert report.provenance("cmd")["git_dirty"] is True
