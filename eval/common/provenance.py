"""Provenance of the committed results, recovered from git history after the fact.

    python -m eval.common.provenance     # -> eval/results/PROVENANCE.md and provenance.json

Reports written through eval.common.report carry their own provenance (a "provenance"
key in their JSON). The results committed before it existed do not: they cannot be rerun
for it, so this recovers what the repository still knows about each file --

- commit: the last commit that changed the file's content (`git log --follow`, skipping
  pure renames such as the move into eval/results/<suite>/), with its date;
- command: the command line the file itself states (a `Command: ...` or `Produced by ...`
  line in its Markdown, a "command" key in its JSON); for a JSON or PNG without one, the
  line of the Markdown report of the same run (named in the table);
- machine: the CPU, thread count or torch version the file states, the same way.

The study results moved to docs/notes/studies-2026-11/ for the research log are not covered
(the generated table says so): their rows were copied into that folder's PROVENANCE.md when
they moved. Anything not stated is "not recorded": the recovery does not guess. Run it again after
adding or changing a result (tests/test_eval_provenance.py checks that every results file
is listed).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from eval.common.report import RESULTS, ROOT, provenance

NOT_RECORDED = "not recorded"
OWN_FILES = ("PROVENANCE.md", "provenance.json")
# Plots and secondary tables are named after their run's report with one of these endings.
DERIVED = ("-frames", "-training", "-quality", "-samples")
# Not covered: the study results moved out of eval/results/ for the research log, whose rows
# were copied into that folder's own PROVENANCE.md when they moved.
STUDIES = "docs/notes/studies-2026-11"
STUDIES_NOTE = (f"Not covered: the study results of November 2026 (seed spreads, ablations, sweeps, "
                f"superseded variants), kept for the research log in {STUDIES}/ -- their provenance, "
                f"recovered before the move, is in that folder's PROVENANCE.md.")
COMMAND = [re.compile(r"Command: `([^`]+)`"), re.compile(r"Produced by `([^`]+)`")]
MACHINE = [re.compile(r"Machine: ([^.]+(?:\.\d+[^.]*)*)\."),
           re.compile(r"^(CPU \([^)]*\)[^;\n]*)", re.M),
           re.compile(r"\((\d+ threads?, torch [^,)]+)"),
           re.compile(r"(\d+ thread(?:s|\(s\))?, torch [0-9][^;,\s]*)")]


def results_files() -> list[Path]:
    """Every committed-or-not results file under eval/results/<suite>/, sorted."""
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p.name not in OWN_FILES)


def last_change(path: Path) -> tuple[str, str]:
    """(commit, date) of the last commit that changed `path`'s content, pure renames skipped."""
    out = subprocess.run(["git", "log", "--follow", "-M", "--format=@%H\t%ad", "--date=short",
                          "--name-status", "--", str(path.relative_to(ROOT))],
                         cwd=ROOT, capture_output=True, text=True).stdout
    commit = None
    for line in out.splitlines():
        if line.startswith("@"):
            commit = line[1:].split("\t")
        elif line.strip() and commit is not None:
            if not line.startswith("R100"):
                return commit[0], commit[1]
            commit = None
    return NOT_RECORDED, NOT_RECORDED


def _first(patterns: list[re.Pattern], text: str) -> str | None:
    for pattern in patterns:
        match = pattern.search(text)
        if match:
            return match.group(1).strip()
    return None


def stated(path: Path) -> tuple[str | None, str | None]:
    """(command, machine) as the file itself states them, None where it does not."""
    if path.suffix == ".md":
        head = "\n".join(path.read_text(errors="replace").splitlines()[:12])
        return _first(COMMAND, head), _first(MACHINE, head)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except ValueError:
            return None, None
        if not isinstance(data, dict):
            return None, None
        if isinstance(data.get("provenance"), dict):  # written by eval.common.report
            prov = data["provenance"]
            return prov.get("command"), json.dumps(prov.get("machine"))
        settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
        machine = data.get("machine") or settings.get("machine")
        return data.get("command"), (str(machine) if machine else None)
    return None, None


def report_of(path: Path) -> Path | None:
    """The Markdown report of the run that wrote `path` (a JSON, a plot), if there is one."""
    stem = path.stem
    for _ in range(2):
        candidate = path.with_name(stem + ".md")
        if candidate != path and candidate.exists():
            return candidate
        for ending in DERIVED:
            if stem.endswith(ending):
                stem = stem.removesuffix(ending)
                break
        else:
            break
    return None


def entry(path: Path) -> dict:
    commit, date = last_change(path)
    command, machine = stated(path)
    source = {"command": "the file", "machine": "the file"}
    report = report_of(path) if (command is None or machine is None) else None
    if report is not None:
        rcommand, rmachine = stated(report)
        if command is None and rcommand is not None:
            command, source["command"] = rcommand, report.name
        if machine is None and rmachine is not None:
            machine, source["machine"] = rmachine, report.name
    machine = machine.rstrip(".") if machine else machine
    return {"file": path.relative_to(RESULTS).as_posix(), "suite": path.relative_to(RESULTS).parts[0],
            "commit": commit, "date": date,
            "command": command or NOT_RECORDED, "command_from": source["command"] if command else None,
            "machine": machine or NOT_RECORDED, "machine_from": source["machine"] if machine else None}


def _cell(value: str | None, source: str | None) -> str:
    if value == NOT_RECORDED:
        return NOT_RECORDED
    text = f"`{value}`" if "`" not in value else value
    return text.replace("|", "\\|") + ("" if source in (None, "the file") else f" (from {source})")


def write(entries: list[dict]) -> None:
    counts = {k: sum(e[k] != NOT_RECORDED for e in entries) for k in ("commit", "command", "machine")}
    generator = provenance()
    (RESULTS / "provenance.json").write_text(json.dumps({
        "recovered": "after the fact, from git history and the files' own text; see eval/common/provenance.py",
        "generated_by": {k: generator[k] for k in ("command", "git_commit", "created")},
        "not_covered": {"path": STUDIES, "reason": STUDIES_NOTE},
        "counts": {"files": len(entries), **counts}, "files": entries}, indent=2) + "\n")
    lines = ["# Provenance of the committed results", "",
             "**Recovered after the fact** by `python -m eval.common.provenance`, not recorded when "
             "the results were made: these files predate eval/common/report.py, whose reports carry "
             "their own provenance (qdiff version, commit, machine, torch, command). For each file: "
             "the last commit that changed its content (`git log --follow`, pure renames such as the "
             "move into eval/results/<suite>/ skipped) -- the results were committed after their run, "
             "so the code that made them is that commit or an earlier one; and the command and machine "
             "where the file (or, for a JSON or plot, its run's Markdown report) states them. "
             "\"not recorded\" means the file does not say; nothing here is guessed. "
             "The same in machine-readable form: [provenance.json](provenance.json).", "",
             f"{len(entries)} files: {counts['commit']} with a commit, {counts['command']} with a command, "
             f"{counts['machine']} with a machine.", "",
             STUDIES_NOTE.replace(f"{STUDIES}/", f"[{STUDIES}/](../../{STUDIES}/PROVENANCE.md)"), ""]
    for suite in sorted({e["suite"] for e in entries}):
        lines += [f"## {suite}", "", "| file | last changed | command | machine |", "|---|---|---|---|"]
        for e in (e for e in entries if e["suite"] == suite):
            name = e["file"].split("/", 1)[1]
            changed = NOT_RECORDED if e["commit"] == NOT_RECORDED else f"{e['commit'][:10]} ({e['date']})"
            lines.append(f"| [{name}]({e['file']}) | {changed} | {_cell(e['command'], e['command_from'])} | "
                         f"{_cell(e['machine'], e['machine_from'])} |")
        lines.append("")
    (RESULTS / "PROVENANCE.md").write_text("\n".join(lines))


def main() -> None:
    entries = [entry(path) for path in results_files()]
    write(entries)
    print(f"{len(entries)} results files -> {RESULTS / 'PROVENANCE.md'}, {RESULTS / 'provenance.json'}")


if __name__ == "__main__":
    main()
